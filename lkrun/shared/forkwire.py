"""The fork server's control channel, as both ends name it: the daemon
(lkrun.supervision.forkserver) and the fork server (lkrun.child.zygote, which describes the
exchange). One SOCK_SEQPACKET packet per message, in jobpipe's encoding."""

# daemon -> fork server
FORK = "fork"
RETIRE = "retire"
# fork server -> daemon
READY = "ready"
FAILED = "failed"
FORKED = "forked"
FORK_FAILED = "fork_failed"
EXITED = "exited"

PACKET = 65536  # the largest message either end reads
FDS_PER_CHILD = 3  # stdin, stdout, stderr
