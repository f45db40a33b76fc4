"""The ``imagegem`` command line: sample, demo, UI, SQL on the catalog, the tour, benchmarks."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from pipelines import config
from pipelines.resources import PipelineResources, WarehouseResource


def _resources() -> PipelineResources:
    return config.resources_from_env(bind_env_vars=False)


def _settings() -> WarehouseResource:
    return _resources().warehouse


def cmd_sample(args: argparse.Namespace) -> int:
    from pipelines.sample.generator import SampleSpec, generate_sample

    if args.scale == "full":
        spec = SampleSpec.full(seed=args.seed)
    else:
        spec = SampleSpec(users=args.users, loras=args.loras, images=args.images, seed=args.seed)

    def progress(stage: str, done: int, total: int) -> None:
        print(f"  {stage}: {done:,}/{total:,}", file=sys.stderr)

    summary = generate_sample(Path(args.out), spec, progress=progress)
    print(summary)
    return 0


def _print_query(con, sql: str, max_rows: int) -> None:
    con.sql(sql).show(max_rows=max_rows, max_width=160)


def cmd_sql(args: argparse.Namespace) -> int:
    import duckdb

    from warehouse.catalog import connect_readonly

    settings = _settings()
    path = args.catalog or settings.catalog_path()
    try:
        con = connect_readonly(path, settings.lake())
        for name, value in args.var or []:
            con.execute(
                f"SET VARIABLE {name} = ?", [int(value) if value.lstrip("-").isdigit() else value]
            )
        _print_query(con, args.query, args.max_rows)
    except (duckdb.Error, FileNotFoundError) as exc:
        print(f"imagegem sql: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_tour(args: argparse.Namespace) -> int:
    """Where the warehouse is, and the example questions answered on it."""
    from warehouse.catalog import connect_readonly
    from warehouse.sqlfiles import questions

    settings = _settings()
    path = settings.catalog_path()
    con = connect_readonly(path, settings.lake())
    print(f"\nThe warehouse catalog is {path}")
    print(
        f'Query it with:  .venv/bin/imagegem sql "SELECT * FROM loras LIMIT 5"  (or duckdb -readonly {path})\n'
    )
    print("Table 1 of the paper on this data (raw vs safety-filtered):")
    _print_query(con, "SELECT * EXCLUDE (distinct_image_ids) FROM table1_stats", 5)
    examples = {
        "tag": "SELECT t FROM (SELECT unnest(tags) AS t FROM loras) GROUP BY t ORDER BY count(*) DESC, t LIMIT 1",
        "image_id": "SELECT imageId FROM image_loras WHERE n_loras > 1 ORDER BY imageId LIMIT 1",
        "user_hash": "SELECT userHash FROM users WHERE is_uploader ORDER BY n_image_rows DESC, userHash LIMIT 1",
        "model_version_id": "SELECT modelVersionId FROM loras ORDER BY n_users DESC, modelVersionId LIMIT 1",
    }
    for name, sql in examples.items():
        row = con.execute(sql).fetchone()
        if row is not None:
            con.execute(f"SET VARIABLE {name} = ?", [row[0]])
    for name, sql in questions().items():
        comment = next((ln[3:] for ln in sql.splitlines() if ln.startswith("-- ")), name)
        print(f"\n== {name}: {comment}")
        _print_query(con, sql, 6)
    return 0


def _ensure_sample(warehouse: WarehouseResource) -> str:
    from pipelines.sample.generator import SampleSpec
    from pipelines.sources import ensure_sample

    sample = warehouse.sample_dir()
    spec = SampleSpec(users=warehouse.sample_users, seed=warehouse.sample_seed)
    ensure_sample(sample, spec, logging.getLogger("imagegem.demo"))
    return sample


@contextlib.contextmanager
def _local_civitai(resources: PipelineResources):
    """The demo's world: with the sample source, the sample served by a local fake Civitai
    (crawl and downloads use it); yields the resources to run with and the server (or None)."""
    from pipelines.civitai.fake_server import serve_sample
    from pipelines.resources import CivitaiResource

    if resources.warehouse.source != "sample":
        yield resources, None
        return
    with serve_sample(_ensure_sample(resources.warehouse)) as server:
        civitai = CivitaiResource(
            base_url=server.url, api_token=resources.civitai.api_token, rate_limit=0
        )
        yield resources.replace(civitai=civitai), server


def _instance():
    import dagster as dg

    if config.dagster_home():
        return dg.DagsterInstance.get()
    print("DAGSTER_HOME is unset: runs are not kept (make demo sets it)", file=sys.stderr)
    return dg.DagsterInstance.ephemeral()


def cmd_demo(args: argparse.Namespace) -> int:
    """The product tour: sample → local fake Civitai → crawl, warehouse, media → SQL answers,
    then a short summary per asset and where to look next."""
    import time

    from pipelines.runner import format_checks, format_summary, materialize_runs, stage_rows

    logging.getLogger("imagegem").setLevel(logging.INFO)
    resources = _resources()
    started = time.monotonic()
    with _local_civitai(resources) as (run_with, server):
        if server is not None:
            print(f"fake Civitai serving the sample at {server.url} (crawl and downloads use it)")
        results = materialize_runs(
            run_with, _instance(), raise_on_error=False, log_level=args.log_level
        )
    seconds = time.monotonic() - started
    ok = all(r.success for r in results)
    code = cmd_tour(args) if ok else 1
    jobs = ", ".join(sorted({r.dagster_run.job_name for r in results}))
    print(f"\nSummary: {len(results)} run(s) of {jobs} in {seconds:,.0f} s\n")
    print(format_summary(stage_rows(results)))
    print("\n" + format_checks(results))
    if not ok:
        print("\nsome steps failed: see the run in the Dagster UI (make ui)", file=sys.stderr)
    print(
        "\nWhere to look next:\n"
        "  make ui                                 runs, logs, asset metadata and checks "
        "(http://127.0.0.1:3000)\n"
        '  .venv/bin/imagegem sql "SELECT ..."     SQL on the warehouse, read-only\n'
        "  .venv/bin/imagegem tour                 the example questions again\n"
        f"  catalog: {resources.warehouse.catalog_path()}  (any DuckDB client, -readonly)"
    )
    return code


def cmd_ui(args: argparse.Namespace) -> int:
    """``dagster dev`` over the demo's world: the fake Civitai alongside, so the UI can re-run
    every asset (crawl and downloads included) on the same data and instance."""
    resources = _resources()
    local = resources.civitai.base_url is None
    with contextlib.ExitStack() as stack:
        extra: dict[str, str] = {}
        if local:
            _, server = stack.enter_context(_local_civitai(resources))
            if server is not None:
                extra = {"CIVITAI_BASE_URL": server.url, "CIVITAI_RATE_LIMIT": "0"}
                print(f"fake Civitai serving the sample at {server.url}", flush=True)
        more = args.dagster[1:] if args.dagster[:1] == ["--"] else args.dagster
        # `dagster dev` suggests `dg dev`, which needs the dagster-dg-cli package: not here.
        quiet = ["-W", "ignore:Function `dev_command` is superseded"]
        command = [sys.executable, *quiet, "-m", "dagster", "dev", "-w", args.workspace, *more]
        child = subprocess.Popen(command, env=config.environment_for(extra))
        # A TERM to this process stops dagster dev too (Ctrl-C reaches both already).
        previous = signal.signal(signal.SIGTERM, lambda *_: child.terminate())
        try:
            return child.wait()
        except KeyboardInterrupt:  # let dagster dev shut its services down
            return child.wait()
        finally:
            signal.signal(signal.SIGTERM, previous)


def similar_images(
    resources: PipelineResources, image_id: int | None, text: str | None, k: int
) -> list[tuple[int, float, str | None]]:
    """(imageId, cosine similarity, prompt) of the k images nearest to an image or a text,
    from the latest ``image_index`` (and, for a text, the encoder that made its vectors)."""
    import tempfile

    from ml.index import VectorIndex, similar_by_id, similar_by_vector
    from warehouse.artifacts import latest_artifact

    lake = resources.warehouse.lake()
    artifact = latest_artifact(lake, "image_index")
    if artifact is None:
        raise SystemExit("no image index yet: materialize image_index first (make demo)")
    path = artifact.file("image_index.usearch")
    scratch = tempfile.mkdtemp(prefix="imagegem-index-")
    if lake.remote:
        local = os.path.join(scratch, "image_index.usearch")
        lake.fs.get(path, local)
        path = local
    index = VectorIndex.load(path)
    if image_id is not None:
        if image_id not in index:
            raise SystemExit(
                f"imageId {image_id} is not in the image index ({len(index):,} images)"
            )
        hits = similar_by_id(index, image_id, k)
    else:
        encoder = resources.encoder.load(lake, os.path.join(scratch, "encoder"))
        if encoder.tag != artifact.encoder:
            raise SystemExit(
                f"the index holds vectors of {artifact.encoder}, the configured encoder is "
                f"{encoder.tag}: rematerialize the embeddings"
            )
        vector = encoder.encode_token_tensors(encoder.tokenizer([text or ""]))[0].numpy()
        hits = similar_by_vector(index, vector, k)
    prompts: dict[int, str] = {}
    if hits:
        con = resources.warehouse.duck()
        ids = ", ".join(str(int(i)) for i, _ in hits)
        rows = con.execute(
            f"SELECT imageId, any_value(prompt) FROM {lake.scan('images')} "
            f"WHERE imageId IN ({ids}) GROUP BY imageId"
        ).fetchall()
        prompts = {int(i): p for i, p in rows}
    return [(int(i), float(sim), prompts.get(int(i))) for i, sim in hits]


def cmd_similar(args: argparse.Namespace) -> int:
    if (args.image_id is None) == (args.text is None):
        print("give exactly one of --image-id or --text", file=sys.stderr)
        return 2
    rows = similar_images(_resources(), args.image_id, args.text, args.k)
    width = max((len(str(i)) for i, _, _ in rows), default=7)
    print(f"{'imageId':>{width}}  cosine  prompt")
    for image_id, similarity, prompt in rows:
        text = (prompt or "").replace("\n", " ")
        print(f"{image_id:>{width}}  {similarity:6.3f}  {text[:90]}")
    return 0


def cmd_fake_civitai(args: argparse.Namespace) -> int:
    from pipelines.civitai.fake_server import run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from pipelines.bench import run_benchmark

    runs = tuple(r.strip() for r in args.runs.split(",") if r.strip())
    return run_benchmark(Path(args.work), memory_limit=args.memory_limit, runs=runs)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=config.log_level())
    parser = argparse.ArgumentParser(prog="imagegem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("sample", help="write an ImageGem-shaped sample release (+ truth/)")
    p.add_argument("--out", required=True)
    p.add_argument("--users", type=int, default=500)
    p.add_argument("--loras", type=int, default=None, help="model rows (default: from --users)")
    p.add_argument("--images", type=int, default=None, help="image rows (default: from --users)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--scale",
        choices=["default", "full"],
        default="default",
        help="full = ImageGem's size (5,658,107 image rows), metadata only",
    )
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("sql", help="run a query read-only on the warehouse catalog")
    p.add_argument("query")
    p.add_argument(
        "--catalog", default=None, help="catalog file (default: $IMAGEGEM_HOME/warehouse.duckdb)"
    )
    p.add_argument(
        "--var",
        nargs=2,
        action="append",
        metavar=("NAME", "VALUE"),
        help="SET VARIABLE NAME = VALUE before the query (for getvariable())",
    )
    p.add_argument("--max-rows", type=int, default=40)
    p.set_defaults(func=cmd_sql)

    p = sub.add_parser(
        "tour", help="print where the warehouse is and the example questions' answers"
    )
    p.set_defaults(func=cmd_tour)

    p = sub.add_parser(
        "demo", help="the whole pipeline on the sample, served by a local fake Civitai"
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        help="Dagster console log level of the runs (DEBUG shows every event; the instance "
        "keeps them all anyway)",
    )
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "ui", help="the Dagster UI (dagster dev) with the demo's local fake Civitai alongside"
    )
    p.add_argument("--workspace", default="workspace.yaml")
    p.add_argument("dagster", nargs=argparse.REMAINDER, help="more `dagster dev` options")
    p.set_defaults(func=cmd_ui)

    p = sub.add_parser(
        "similar", help="the images nearest to an image (--image-id) or a text (--text)"
    )
    p.add_argument("--image-id", type=int, default=None)
    p.add_argument("--text", default=None)
    p.add_argument("--k", type=int, default=10)
    p.set_defaults(func=cmd_similar)

    from pipelines.civitai.fake_server import add_arguments as fake_civitai_arguments

    p = sub.add_parser("fake-civitai", help="serve a sample release through the Civitai API v1")
    fake_civitai_arguments(p)
    p.set_defaults(func=cmd_fake_civitai)

    p = sub.add_parser("bench", help="full-scale ingest + clean + catalog benchmark")
    p.add_argument("--work", default="bench/out")
    p.add_argument("--memory-limit", default="2GB", help="DuckDB memory limit")
    p.add_argument(
        "--runs",
        default="sharded,single,pandas,rest",
        help="which runs, comma-separated (default: all): sharded, single, pandas, rest",
    )
    p.set_defaults(func=cmd_bench)

    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
