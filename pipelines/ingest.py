"""Ingest entry point: ``ray job submit --working-dir . -- python pipelines/ingest.py --input ... --output ...``.

Takes the same arguments as ``mermed ingest`` (``pipelines/cli.py``); the Ray Data graph is ``ingest.pipeline``.
"""

if __name__ == "__main__":
    from entrypoint import run_command

    run_command("ingest")
