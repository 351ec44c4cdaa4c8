"""Runs fedge's Flower apps in Flower's simulation engine."""
