"""The end-to-end test's own client for the customer's bucket on moto.

Usage: bucket.py COMMAND [ARGUMENT...], with the endpoint, bucket and
credentials in E2E_S3_ENDPOINT, E2E_S3_BUCKET, E2E_S3_ACCESS_KEY_ID and
E2E_S3_SECRET_ACCESS_KEY (never read from the AWS default chain).

Commands:
  create-bucket          create the bucket
  put KEY FILE           upload FILE as KEY ("-" reads standard input)
  get KEY                print the object's body; exit status 3 when absent
  list PREFIX            print the keys under PREFIX, one a line, sorted
"""

import os
import sys

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

MISSING = 3


def client():
    return boto3.client(
        "s3",
        endpoint_url=os.environ["E2E_S3_ENDPOINT"],
        aws_access_key_id=os.environ["E2E_S3_ACCESS_KEY_ID"],
        aws_secret_access_key=os.environ["E2E_S3_SECRET_ACCESS_KEY"],
        # us-east-1 needs no LocationConstraint when creating a bucket.
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def main(arguments):
    if not arguments:
        sys.stderr.write(__doc__)
        return 2
    command, rest = arguments[0], arguments[1:]
    s3 = client()
    bucket = os.environ["E2E_S3_BUCKET"]

    if command == "create-bucket" and not rest:
        s3.create_bucket(Bucket=bucket)
    elif command == "put" and len(rest) == 2:
        key, path = rest
        body = sys.stdin.buffer.read() if path == "-" else open(path, "rb").read()
        s3.put_object(Bucket=bucket, Key=key, Body=body)
    elif command == "get" and len(rest) == 1:
        try:
            response = s3.get_object(Bucket=bucket, Key=rest[0])
        except ClientError as error:
            if error.response["Error"]["Code"] in ("NoSuchKey", "404"):
                return MISSING
            raise
        sys.stdout.buffer.write(response["Body"].read())
    elif command == "list" and len(rest) == 1:
        keys = []
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=rest[0])
        for page in pages:
            keys.extend(entry["Key"] for entry in page.get("Contents", []))
        for key in sorted(keys):
            print(key)
    else:
        sys.stderr.write(f"bucket.py: invalid command line {arguments!r}\n{__doc__}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
