"""Meters that watch a cell while it trains: firing rates, memory, operations, speed."""
