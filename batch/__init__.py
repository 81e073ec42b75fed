"""Batch generation from a jobs file, in this process or on a Ray cluster (the ``ray`` extra).

    from edgediff.batch import run_batch
    summary = run_batch("jobs.jsonl", "out/", ray=None)   # ray="" starts a local Ray cluster
"""
from .jobs import FIELDS, Job, JobsFileError, derived_seed, plan_jobs, read_jobs
from .runner import Summary, run_batch

__all__ = ["run_batch", "Summary", "read_jobs", "plan_jobs", "derived_seed", "Job", "JobsFileError", "FIELDS"]
