"""What happens to results after detection: tracking per stream, zones and lines, the event engine,
the SQLite event store and the snapshots of each event's best view."""
