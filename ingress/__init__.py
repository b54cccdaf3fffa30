"""The thin edge: accept Roistat webhooks and answer only once RabbitMQ has confirmed them."""
