"""The roles a node plays in a training job: requester, master, worker."""
