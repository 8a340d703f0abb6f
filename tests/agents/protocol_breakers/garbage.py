"""Breaks the job protocol: prints a line that is not a message on stdout."""

from speaker import Speaker, run

run(Speaker(junk_on_stdout=True))
