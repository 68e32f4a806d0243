"""Exit codes of the `ravenp2p` command line.

0 success; 1 the operation failed (a job failed or was cancelled when waited
for, a chain refused a transaction, ...); 2 bad usage or invalid
configuration; 3 no running node could be reached.
"""

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
