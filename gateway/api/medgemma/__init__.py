"""The seed's chat API: ``POST /medgemma``."""
