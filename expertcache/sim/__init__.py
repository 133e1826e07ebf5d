"""Measurement and simulation: the trace format, recording, the clocked Reader, trace replays
through the engine's own cache rules, hardware profiles, and Belady's optimum."""
