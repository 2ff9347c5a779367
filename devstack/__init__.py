"""Local process tooling for the demo and tests."""
