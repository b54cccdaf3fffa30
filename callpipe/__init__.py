"""callpipe: Roistat call-tracking webhooks to PostgreSQL rows and events, losing nothing."""
