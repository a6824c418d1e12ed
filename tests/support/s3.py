"""S3 buckets on each S3 server the tests start (fixtures in ``tests/conftest.py``)."""

import uuid

S3_SERVERS = ("moto", "s3rver")


def s3_bucket(request, server):
    """``(url, storage_options)`` of a fresh bucket on ``server`` ("moto" or "s3rver")."""
    import s3fs

    options = dict(request.getfixturevalue("s3_server" if server == "moto" else "s3rver_server"))
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    s3fs.S3FileSystem(**options).mkdir(bucket)
    return f"s3://{bucket}/run", options
