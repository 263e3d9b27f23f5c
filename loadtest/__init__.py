"""kvgate loadtest package."""
