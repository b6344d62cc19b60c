"""Glimpse environments over feature grids (see DESIGN.md)."""
