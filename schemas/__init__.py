"""The contract shared by the ingress, the workers and downstream subscribers."""
