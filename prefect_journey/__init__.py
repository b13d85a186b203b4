"""Prefect 3 integration for the JourneyAPI image API."""
