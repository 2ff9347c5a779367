"""Small routers: models, health, conversations."""
