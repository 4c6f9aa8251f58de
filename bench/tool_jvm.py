"""What roles/kafka's kafka_tool_java_opts buy: the role's admin-tool calls with its options
beside the same calls with the JVM's defaults, as ratios (options / defaults; a ratio above 1.0
means the options cost more than they save).

    python -m bench.tool_jvm              # 5 rounds (~1 min on 2 cores)
    python -m bench.tool_jvm --rounds 10

Each call is a fresh JVM, as in the role, against a secure harness broker on loopback (SASL_SSL +
SCRAM-SHA-512, the protocol of the role's CLIENT listener), with two of the role's calls: the SCRAM
login check (BrokerApiVersionsCommand as a user) and an admin listing (TopicCommand --list as the
admin principal). The two variants alternate within each round, so both see the same machine load.
CPU is user + system time of the tool's process (its children's rusage), the figure that grows most
on a slow host (a VM under software emulation).
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import yaml

from bench.core import ADMIN_USER, SCRAM, KafkaCluster, java_home, kafka_home, log

REPO = Path(__file__).resolve().parents[1]
CEILING = 1.0


def role_options() -> list[str]:
    """The options the role ships (its defaults file), so the benchmark measures what deploys."""
    defaults = yaml.safe_load((REPO / "roles/kafka/defaults/main.yml").read_text())
    return [str(o) for o in defaults["kafka_tool_java_opts"]]


def client_properties(kafka: KafkaCluster, user: str, path: Path) -> Path:
    assert kafka.ca is not None
    password = kafka.passwords[user]
    path.write_text(
        "security.protocol=SASL_SSL\n"
        f"sasl.mechanism={SCRAM}\n"
        "ssl.truststore.type=PEM\n"
        f"ssl.truststore.location={kafka.ca.cert_path}\n"
        "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{user}" password="{password}";\n')
    path.chmod(0o600)
    return path


def timed(argv: list[str]) -> tuple[float, float]:
    """(wall s, CPU s) of one tool call; fails loudly if the tool did."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    wall = time.monotonic() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"tool failed (rc {proc.returncode}): {' '.join(argv[-4:])}\n"
                         f"{proc.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tool_jvm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    options = role_options()
    java = str(java_home() / "bin" / "java")
    classpath = f"{kafka_home()}/libs/*"
    kafka = KafkaCluster(brokers=1, secure=True)
    try:
        props = client_properties(kafka, ADMIN_USER, kafka.root / "bench-admin.properties")
        tools = {
            "login_check": ["org.apache.kafka.tools.BrokerApiVersionsCommand",
                            "--bootstrap-server", kafka.bootstrap_servers,
                            "--command-config", str(props)],
            "topic_list": ["org.apache.kafka.tools.TopicCommand",
                           "--bootstrap-server", kafka.bootstrap_servers,
                           "--command-config", str(props), "--list"],
        }
        variants = {"defaults": [], "role": options}
        runs: dict[tuple[str, str], list[tuple[float, float]]] = {
            (t, v): [] for t in tools for v in variants}
        for tail in tools.values():  # one warm-up call each: the page cache, not the JVM
            timed([java, "-cp", classpath, *tail])
        for r in range(args.rounds):
            for tool, tail in tools.items():
                for variant, opts in variants.items():
                    runs[(tool, variant)].append(timed([java, *opts, "-cp", classpath, *tail]))
            log(f"tool_jvm: round {r + 1}/{args.rounds} done")
    finally:
        kafka.close()

    print(f"kafka_tool_java_opts = {' '.join(options)}  ({args.rounds} rounds, "
          f"{os.cpu_count()} cores; ratio = role / JVM defaults, ceiling {CEILING:.2f})")
    print(f"{'call':<12} {'defaults cpu':>12} {'role cpu':>9} {'cpu ratio':>9} "
          f"{'defaults wall':>13} {'role wall':>9} {'wall ratio':>10}")
    worst = 0.0
    for tool in tools:
        d_wall = statistics.median(w for w, _ in runs[(tool, "defaults")])
        d_cpu = statistics.median(c for _, c in runs[(tool, "defaults")])
        r_wall = statistics.median(w for w, _ in runs[(tool, "role")])
        r_cpu = statistics.median(c for _, c in runs[(tool, "role")])
        worst = max(worst, r_cpu / d_cpu)
        print(f"{tool:<12} {d_cpu:>11.2f}s {r_cpu:>8.2f}s {r_cpu / d_cpu:>9.2f} "
              f"{d_wall:>12.2f}s {r_wall:>8.2f}s {r_wall / d_wall:>10.2f}")
    verdict = "OK" if worst <= CEILING else "OVER CEILING"
    print(f"tool_jvm: worst cpu ratio {worst:.2f} (ceiling {CEILING:.2f}) {verdict}")
    return 0 if worst <= CEILING else 1


if __name__ == "__main__":
    sys.exit(main())
