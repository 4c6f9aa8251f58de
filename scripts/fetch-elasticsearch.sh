#!/usr/bin/env bash
# Fetch the runnable Elasticsearch integ-test distribution (zip, no bundled JDK, no x-pack) from
# Maven Central into .cache/elasticsearch/. Prints the zip path. Cached.
set -euo pipefail
. "$(dirname "$0")/versions.sh"
dir="$LOGPIPE_CACHE/elasticsearch"
zip="$dir/elasticsearch-${ELASTICSEARCH_VERSION}.zip"
if [ ! -s "$zip" ]; then
  command -v mvn >/dev/null || { echo "fetch-elasticsearch: Maven (mvn) is required" >&2; exit 1; }
  mkdir -p "$dir"
  mvn -B -q -Dmaven.repo.local="$LOGPIPE_CACHE/m2" dependency:copy \
    -Dartifact="org.elasticsearch.distribution.integ-test-zip:elasticsearch:${ELASTICSEARCH_VERSION}:zip" \
    -DoutputDirectory="$dir" >&2
fi
echo "$zip"
