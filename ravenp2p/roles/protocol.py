"""Names shared by the roles: topics and protocol ids of a training job."""

from __future__ import annotations

JOBS_TOPIC = "/ravenp2p/jobs/1"
"""Masters announce the jobs they run here; compute nodes listen."""
SUBMIT_PROTOCOL = "/ravenp2p/job-submit/1.0.0"
"""Request/response: a requester hands a job to a master."""
RESULT_PROTOCOL = "/ravenp2p/job-result/1.0.0"
"""Stream: a worker delivers a signed result header and the result bytes to the master."""
REPLICA_PROTOCOL = "/ravenp2p/job-replica/1.0.0"
"""Request/response: a paid job's master hands a committee member the state to resume from."""


def job_topic(job_id: str) -> str:
    """The topic carrying one job's assignments, round records and evaluations."""
    return f"/ravenp2p/job/{job_id}/1"
