"""Check webdataset shards: count samples, fully decode every image, report bad samples.

Prints one row per shard (samples, bad samples, problem), the bad samples by reason and
the first bad keys. Exits with status 1 when a shard is structurally broken (missing
file, unreadable or truncated tar); bad samples alone are reported but do not fail.

    python data_tools/check_shards.py "/data/laion/{00000..01234}.tar" --processes 8
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from multiprocessing import Pool

from tqdm import tqdm

from blip2_megatron.data.wds import expand_shard_patterns, inspect_shard


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("shards", nargs="+", help="shard paths or brace patterns")
    parser.add_argument("--processes", type=int, default=1, help="shards checked in parallel")
    parser.add_argument("--show-keys", type=int, default=20, help="bad sample keys listed (default 20)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    urls = expand_shard_patterns(args.shards)
    progress = dict(total=len(urls), desc="checking shards", unit="shard")
    if args.processes > 1:
        with Pool(args.processes) as pool:
            reports = list(tqdm(pool.imap(inspect_shard, urls), **progress))
    else:
        reports = [inspect_shard(url) for url in tqdm(urls, **progress)]

    width = max(len("shard"), *(len(report.url) for report in reports))
    print(f"{'shard':<{width}}  {'samples':>8}  {'bad':>6}  problem")
    for report in reports:
        print(f"{report.url:<{width}}  {report.samples:>8}  {len(report.bad):>6}  {report.error or ''}")
    total_bad = [item for report in reports for item in report.bad]
    broken = [report for report in reports if report.error]
    print(
        f"{'total':<{width}}  {sum(r.samples for r in reports):>8}  {len(total_bad):>6}  {len(broken)} broken shard(s)"
    )
    if total_bad:
        print("\nbad samples by reason:")
        for reason, count in Counter(reason for _, reason in total_bad).most_common():
            print(f"  {count:>8}  {reason}")
        print(f"\nfirst bad keys (of {len(total_bad)}):")
        for key, reason in total_bad[: args.show_keys]:
            print(f"  {key}  {reason}")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main())
