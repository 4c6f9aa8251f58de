#!/usr/bin/env bash
# Assemble Apache Kafka from Maven Central jars into .cache/kafka/kafka_<scala>-<version>/libs
# (the same layout as the official tarball). Prints the directory. Cached: a second run is instant.
set -euo pipefail
. "$(dirname "$0")/versions.sh"
dest="$LOGPIPE_CACHE/kafka/kafka_${KAFKA_SCALA_VERSION}-${KAFKA_VERSION}"
if [ ! -f "$dest/.complete" ]; then
  command -v mvn >/dev/null || { echo "fetch-kafka: Maven (mvn) is required" >&2; exit 1; }
  rm -rf "$dest"; mkdir -p "$dest/libs"
  mvn -B -q -f "$LOGPIPE_TOP/harness/kafka-pom.xml" \
    -Dmaven.repo.local="$LOGPIPE_CACHE/m2" \
    -Dkafka.version="$KAFKA_VERSION" -Dscala.binary="$KAFKA_SCALA_VERSION" \
    dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$dest/libs" >&2
  ls "$dest/libs"/kafka_"${KAFKA_SCALA_VERSION}"-"${KAFKA_VERSION}".jar >/dev/null
  touch "$dest/.complete"
fi
echo "$dest"
