"""Real local stand-ins for remote services (hub, GCS), started and stopped by the tests themselves."""
