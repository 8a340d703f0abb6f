"""The daemon's jobs as records: the live book, their fields, the SQLite history and
per-job log files."""
