"""What the gateway does, with no HTTP in it: admission, turns, jobs and their supervision,
the relay, conversations, images, API keys, audit, metrics."""
