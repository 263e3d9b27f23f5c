"""kvgate worker package."""
