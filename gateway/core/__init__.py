"""The small core every layer may use: settings, the error type, shared names."""
