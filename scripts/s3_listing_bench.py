"""Listing an archive on S3 flat against side by side (`storage.list_threads`), on a local moto server.

    python scripts/s3_listing_bench.py [--objects 100000] [--threads 16] [--out FILE]

The archive is the nightly bench's (`artfuse bench --nightly N`): N - 1,000 objects in collections of 100 boxes of
1,000, and 1,000 new ones under arrived-tonight/. Uploading 100k objects over HTTP takes moto many minutes (about
265 objects/s on a quiet machine, far fewer on a busy one), so the server runs in a process of its own, as
`moto_server` does, filled through moto's in-memory backend before it serves. Then the two listings go through
HTTP as a job's would (`artfuse.bench.nightly.compare_listings`). Against a real endpoint, use
`artfuse bench --listing N --archive s3://...`, which uploads the archive once.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os

BUCKET = "listing"
NEW = 1000


def keys(n: int) -> list[str]:
    from artfuse.bench.nightly import NEW_FOLDER, object_key

    archive = f"archive-{n}"
    return [f"{archive}/{object_key(i)}" for i in range(n - NEW)] + [
        f"{archive}/{NEW_FOLDER}/{object_key(i)}" for i in range(NEW)
    ]


def serve(n: int, channel) -> None:
    """A moto server holding the archive's keys (a few bytes each); serves until the channel closes."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends
    from moto.server import ThreadedMotoServer

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    backend.create_bucket(BUCKET, "us-east-1")
    for key in keys(n):
        backend.put_object(BUCKET, key, key.encode())
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    channel.send(server.get_host_and_port())
    try:
        channel.recv()
    except EOFError:
        pass
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=16, help="storage.list_threads for the side-by-side listing")
    parser.add_argument("--out", help="write the result as JSON")
    args = parser.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        os.environ.pop(name, None)
    mine, theirs = multiprocessing.get_context("spawn").Pipe()
    server = multiprocessing.get_context("spawn").Process(target=serve, args=(args.objects, theirs), daemon=True)
    server.start()
    host, port = mine.recv()
    os.environ["AWS_ENDPOINT_URL"] = f"http://{host}:{port}"

    from artfuse.bench.nightly import compare_listings, format_listing
    from artfuse.config import load_config

    cfg = load_config(None, [f"storage.list_threads={args.threads}"])
    result = {"n_objects": args.objects, "server": "moto (ThreadedMotoServer, own process)"}
    result |= compare_listings(f"s3://{BUCKET}/archive-{args.objects}", cfg)
    mine.close()
    server.join(timeout=10)
    print(json.dumps(result, indent=1))
    print(format_listing(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
