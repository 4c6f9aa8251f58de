"""Contract test of roles/kibana's saved objects tasks (tasks/saved_objects.yml).

Kibana cannot be downloaded on the project's machines, so the role's Kibana API calls are run
against ``KibanaContract``: a loopback HTTPS stand-in that accepts exactly the requests Kibana
documents for the endpoints the role uses, answers them the way Kibana documents, and records
every request with what it checked in it. Anything else (an unknown method or path, a missing
``kbn-xsrf`` header or credentials, a wrong content type or query, an ndjson object of another
type or id, a reference that resolves to nothing, a Lens column on a field logpipe's index
template does not have or cannot aggregate) is a contract violation: the stub answers it with
Kibana's error and the test fails. This is a contract test, not an integration test: it proves
the role speaks the documented API, not that a real Kibana renders the dashboard (the real
converge in tests/roles/test_kibana.py stays skipped until a Kibana artifact is given).

What Kibana documents and the stub holds the role to:
  GET  /api/status                       basic auth; answers status.overall.level
  POST [/s/<space>]/api/saved_objects/_export
                                         kbn-xsrf, JSON {objects: [{type, id}], ...}; 200 ndjson
                                         of the objects, or 400 "Error fetching objects to export"
                                         naming each missing one (404)
  POST [/s/<space>]/api/saved_objects/_import?overwrite=true
                                         kbn-xsrf, multipart/form-data with one part named `file`
                                         whose filename ends in .ndjson (Kibana answers 415
                                         otherwise), raw ndjson (no Content-Transfer-Encoding:
                                         Kibana's parser does not decode one); 200
                                         {success, successCount, successResults[, errors]}
"""

from __future__ import annotations

import base64
import datetime
import email
import email.policy
import http.server
import json
import re
import shutil
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.playbook import ANSIBLE_PLAYBOOK, ansible_env
from harness.tls import HttpsServer, Issued, TestCA

from logpipe.admin import MAPPINGS

TOP = Path(__file__).resolve().parents[2]
ROLE = TOP / "roles" / "kibana"
DEFAULTS = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
KIBANA_VERSION = DEFAULTS["kibana_version"]  # what the stub reports, and the newest it accepts
API_USER = "elastic"
API_PASSWORD = "api-password-from-vault"

pytestmark = pytest.mark.skipif(
    ANSIBLE_PLAYBOOK is None, reason="ansible-playbook is not installed"
)


def managed_objects(prefix: str = "logpipe") -> list[tuple[str, str]]:
    """(type, id) of every object the role manages, as its README lists them."""
    return [
        ("index-pattern", f"{prefix}-web-logs"),
        ("lens", f"{prefix}-status-codes"),
        ("lens", f"{prefix}-top-endpoints"),
        ("lens", f"{prefix}-client-ips"),
        ("lens", f"{prefix}-error-rate"),
        ("dashboard", f"{prefix}-web-logs-dashboard"),
    ]


# --- logpipe's index template, as Kibana's field list would show it ----------------------------

_NUMERIC = {"long", "integer", "short", "byte", "double", "float", "half_float", "scaled_float"}


def _kibana_type(es_type: str) -> str:
    """The Lens dataType of a field of this Elasticsearch type."""
    if es_type in _NUMERIC:
        return "number"
    return {"keyword": "string", "text": "string", "ip": "ip", "date": "date"}[es_type]


FIELDS: dict[str, str] = {}
for _name, _spec in MAPPINGS["properties"].items():
    FIELDS[_name] = _spec["type"]
    for _sub, _subspec in _spec.get("fields", {}).items():
        FIELDS[f"{_name}.{_sub}"] = _subspec["type"]
AGGREGATABLE = {name for name, es_type in FIELDS.items() if es_type != "text"}


def _key(obj: dict[str, Any]) -> tuple[str, str]:
    """(type, id) of a saved object or a reference."""
    return str(obj.get("type")), str(obj.get("id"))


def _version_tuple(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


# --- what the stub checks in an ndjson file ----------------------------------------------------


@dataclass
class Verdict:
    """What one request was checked for (``checks``) and what it broke (``violations``)."""

    checks: list[str] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def require(self, ok: bool, check: str, violation: str) -> bool:
        (self.checks if ok else self.violations).append(check if ok else violation)
        return ok


def check_ndjson(
    objects: list[dict[str, Any]],
    expected: list[tuple[str, str]],
    index: str,
    held: dict[tuple[str, str], dict[str, Any]],
    verdict: Verdict,
) -> set[tuple[str, str]]:
    """Check the objects of an import file; return the (type, id) whose references dangle."""
    keys = [_key(o) for o in objects]
    verdict.require(
        sorted(keys) == sorted(expected) and len(set(keys)) == len(keys),
        f"{len(objects)} objects, exactly the managed types/ids",
        f"objects {keys} are not exactly the managed {expected}",
    )
    present = set(keys) | set(held)
    dangling: set[tuple[str, str]] = set()
    newest = _version_tuple(KIBANA_VERSION)
    for obj in objects:
        key = _key(obj)
        label = f"{key[0]} {key[1]}"
        if not verdict.require(
            isinstance(obj.get("attributes"), dict) and isinstance(obj.get("references"), list),
            f"{label}: attributes and references",
            f"{label}: no attributes object or references list",
        ):
            continue
        versions = (obj.get("coreMigrationVersion", ""), obj.get("typeMigrationVersion", ""))
        verdict.require(
            all(re.fullmatch(r"\d+\.\d+\.\d+", v) for v in versions)
            and all(_version_tuple(v) <= newest for v in versions),
            f"{label}: migration versions {versions[0]}/{versions[1]} <= {KIBANA_VERSION}",
            f"{label}: migration versions {versions} missing or newer than Kibana "
            f"{KIBANA_VERSION} (Kibana refuses such an object)",
        )
        for ref in obj["references"]:
            if _key(ref) not in present:
                dangling.add(key)
                verdict.violations.append(
                    f"{label}: reference {ref.get('name')} -> {ref.get('type')} "
                    f"{ref.get('id')} resolves to nothing (Kibana: missing_references)"
                )
        refs = {r.get("name"): (r.get("type"), r.get("id")) for r in obj["references"]}
        if key[0] == "index-pattern":
            _check_data_view(obj, label, index, verdict)
        elif key[0] == "lens":
            _check_lens(obj, label, refs, verdict)
        elif key[0] == "dashboard":
            _check_dashboard(obj, label, refs, present, verdict)
        else:
            verdict.violations.append(f"{label}: a type the role does not manage")
    if not dangling:
        verdict.checks.append("every reference resolves to an object in the file")
    return dangling


def _check_data_view(obj: dict[str, Any], label: str, index: str, verdict: Verdict) -> None:
    attrs = obj["attributes"]
    time_field = attrs.get("timeFieldName")
    verdict.require(
        attrs.get("title") == f"{index}*" and FIELDS.get(time_field) == "date",
        f"{label}: title {attrs.get('title')}, time field {time_field} (date in the mapping)",
        f"{label}: title {attrs.get('title')!r} / time field {time_field!r} is not "
        f"{index}* on a date field",
    )


def _check_lens(
    obj: dict[str, Any], label: str, refs: dict[str, tuple[str, str]], verdict: Verdict
) -> None:
    attrs = obj["attributes"]
    vis_type = attrs.get("visualizationType")
    state = attrs.get("state", {})
    layers = state.get("datasourceStates", {}).get("formBased", {}).get("layers", {})
    if not verdict.require(
        vis_type in {"lnsPie", "lnsXY", "lnsDatatable", "lnsMetric"} and bool(layers),
        f"{label}: {vis_type} with formBased layers",
        f"{label}: visualizationType {vis_type!r} or formBased layers missing",
    ):
        return
    used: list[str] = []
    for layer_id, layer in layers.items():
        ref = refs.get(f"indexpattern-datasource-layer-{layer_id}")
        verdict.require(
            ref is not None and ref[0] == "index-pattern",
            f"{label}: layer {layer_id} -> index-pattern {ref[1] if ref else None}",
            f"{label}: layer {layer_id} has no indexpattern-datasource-layer reference",
        )
        columns: dict[str, dict[str, Any]] = layer.get("columns", {})
        verdict.require(
            sorted(layer.get("columnOrder", [])) == sorted(columns),
            f"{label}: columnOrder lists the columns",
            f"{label}: columnOrder {layer.get('columnOrder')} != columns {sorted(columns)}",
        )
        for col_id, col in columns.items():
            op, source = col.get("operationType"), col.get("sourceField")
            for ref_col in col.get("references", []):
                verdict.require(
                    ref_col in columns,
                    f"{label}: {col_id} -> {ref_col}",
                    f"{label}: column {col_id} references a missing column {ref_col}",
                )
            if op in {"formula", "math"}:
                continue
            if source == "___records___":
                verdict.require(op == "count", f"{label}: {col_id} count",
                                f"{label}: ___records___ with {op}")
                continue
            es_type = FIELDS.get(source or "")
            ok = (
                es_type is not None
                and source in AGGREGATABLE
                and col.get("dataType") == _kibana_type(es_type)
                and (op != "date_histogram" or es_type == "date")
                and (op not in {"sum", "average", "max", "min"} or es_type in _NUMERIC)
            )
            used.append(f"{op}({source}:{es_type})")
            verdict.require(
                ok,
                f"{label}: {col_id} {op} on {source} ({es_type}, aggregatable)",
                f"{label}: column {col_id} {op} on {source!r} ({es_type}) does not fit "
                "logpipe's index template",
            )
        accessors = _accessors(state.get("visualization", {}), layer_id)
        verdict.require(
            bool(accessors) and set(accessors) <= set(columns),
            f"{label}: visualization shows columns {sorted(accessors)}",
            f"{label}: visualization accessors {accessors} are not columns of {layer_id}",
        )
    verdict.checks.append(f"{label}: fields {', '.join(used)}")


def _accessors(vis: dict[str, Any], layer_id: str) -> list[str]:
    """The column ids a Lens visualization state shows for one layer."""
    found: list[str] = []
    for layer in vis.get("layers", [vis]):
        if layer.get("layerId") != layer_id:
            continue
        for key in ("xAccessor", "splitAccessor"):
            if layer.get(key):
                found.append(layer[key])
        for key in ("accessors", "primaryGroups", "metrics"):
            found.extend(layer.get(key, []))
        found.extend(c["columnId"] for c in layer.get("columns", []))
    return found


def _check_dashboard(
    obj: dict[str, Any],
    label: str,
    refs: dict[str, tuple[str, str]],
    present: set[tuple[str, str]],
    verdict: Verdict,
) -> None:
    attrs = obj["attributes"]
    try:
        panels = json.loads(attrs.get("panelsJSON", ""))
        json.loads(attrs.get("optionsJSON", "{}"))
        json.loads(attrs["kibanaSavedObjectMeta"]["searchSourceJSON"])
    except (ValueError, KeyError, TypeError) as exc:
        verdict.violations.append(f"{label}: panelsJSON/optionsJSON/searchSourceJSON: {exc}")
        return
    cells: set[tuple[int, int]] = set()
    targets: list[tuple[str, str]] = []
    for panel in panels:
        index, ref_name = panel.get("panelIndex"), panel.get("panelRefName")
        target = refs.get(f"{index}:{ref_name}")
        grid = panel.get("gridData", {})
        area = {
            (x, y)
            for x in range(grid.get("x", 0), grid.get("x", 0) + grid.get("w", 0))
            for y in range(grid.get("y", 0), grid.get("y", 0) + grid.get("h", 0))
        }
        verdict.require(
            target is not None
            and target[0] == panel.get("type")
            and grid.get("i") == index
            and grid.get("x", 0) + grid.get("w", 0) <= 48
            and not area & cells,
            f"{label}: panel {index} -> {target[0] if target else None} "
            f"{target[1] if target else None}",
            f"{label}: panel {index} has no matching reference {index}:{ref_name}, or its "
            "gridData is off the 48-column grid or overlaps another panel",
        )
        cells |= area
        if target is not None:
            targets.append(target)
    lenses = sorted(k for k in present if k[0] == "lens")
    verdict.require(
        sorted(targets) == lenses and len(refs) == len(panels),
        f"{label}: {len(panels)} panels, one per visualization, every reference used",
        f"{label}: panels show {sorted(targets)}, not the visualizations {lenses}",
    )


# --- the stub --------------------------------------------------------------------------------


@dataclass
class Exchange:
    """One request the stub received, its answer, and what it checked."""

    method: str
    target: str
    status: int
    verdict: Verdict


class KibanaContract:
    """Kibana's status, saved objects export and import API over HTTPS, held to the contract."""

    def __init__(
        self, cert: Issued, *, space: str = "", index: str = "web-logs-topic",
        expected: list[tuple[str, str]] | None = None,
    ) -> None:
        self.space = space
        self.index = index
        self.expected = expected or managed_objects()
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.exchanges: list[Exchange] = []
        self._seq = 0
        self._auth = "Basic " + base64.b64encode(f"{API_USER}:{API_PASSWORD}".encode()).decode()
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                stub._handle(self)

            def do_POST(self) -> None:
                stub._handle(self)

            def do_PUT(self) -> None:
                stub._handle(self)

            def do_DELETE(self) -> None:
                stub._handle(self)

        self._https = HttpsServer(Handler, cert.cert_path, cert.key_path)
        self.port = self._https.port

    def close(self) -> None:
        self._https.close()

    # What a test reads.

    @property
    def violations(self) -> list[str]:
        return [f"{e.method} {e.target}: {v}" for e in self.exchanges for v in e.verdict.violations]

    def requests(self) -> list[tuple[str, str]]:
        return [(e.method, e.target.split("?")[0].rsplit("/", 1)[-1]) for e in self.exchanges]

    def report(self, detail: bool = False) -> str:
        """Every request with what was checked in it. Without ``detail`` the per-object checks
        of an import are counted per object instead of listed."""
        lines = []
        for n, e in enumerate(self.exchanges, 1):
            lines.append(f"{n}. {e.method} {e.target} -> {e.status}")
            per_object: dict[str, list[str]] = {}
            for check in e.verdict.checks:
                label, _, what = check.partition(": ")
                if detail or label.split(" ")[0] not in {"index-pattern", "lens", "dashboard"}:
                    lines.append(f"     ok: {check}")
                else:
                    per_object.setdefault(label, []).append(what)
            for label, whats in per_object.items():
                fields = [w for w in whats if w.startswith("fields ")]
                lines.append(f"     ok: {label}: {len(whats)} checks"
                             + (f" ({fields[0]})" if fields else ""))
            lines.extend(f"     VIOLATION: {v}" for v in e.verdict.violations)
        return "\n".join(lines)

    def edit_in_kibana(self, type_: str, id_: str) -> None:
        """What saving the object in Kibana's UI does: a new version."""
        self.objects[(type_, id_)]["version"] = self._next_version()

    # Kibana's side.

    def _next_version(self) -> str:
        self._seq += 1
        return base64.b64encode(f"[{self._seq},1]".encode()).decode()

    def _handle(self, req: http.server.BaseHTTPRequestHandler) -> None:
        verdict = Verdict()
        url = urllib.parse.urlsplit(req.path)
        body = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        base = (f"/s/{self.space}" if self.space else "") + "/api/saved_objects"
        if req.headers.get("Authorization") != self._auth:
            verdict.violations.append("no basic auth as the role's API user")
            status, ctype, payload = 401, "application/json", _error(401, "Unauthorized", "")
        else:
            verdict.checks.append(f"basic auth as {API_USER}")
            route = (req.command, url.path)
            if route == ("GET", "/api/status"):
                status, ctype, payload = self._status(url, body, verdict)
            elif route == ("POST", f"{base}/_export"):
                status, ctype, payload = self._export(req, url, body, verdict)
            elif route == ("POST", f"{base}/_import"):
                status, ctype, payload = self._import(req, url, body, verdict)
            else:
                verdict.violations.append("not a request of the contract (method, path or space)")
                status, ctype, payload = 404, "application/json", _error(404, "Not Found", "")
        self.exchanges.append(Exchange(req.command, req.path, status, verdict))
        req.send_response(status)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(payload)))
        req.end_headers()
        req.wfile.write(payload)

    def _status(
        self, url: urllib.parse.SplitResult, body: bytes, verdict: Verdict
    ) -> tuple[int, str, bytes]:
        verdict.require(not url.query and not body, "no query, no body",
                        "GET /api/status with a query or a body")
        answer = {
            "name": "kibana-contract",
            "version": {"number": KIBANA_VERSION},
            "status": {"overall": {"level": "available", "summary": "All services are available"}},
        }
        return 200, "application/json", json.dumps(answer).encode()

    def _xsrf(self, req: http.server.BaseHTTPRequestHandler, verdict: Verdict) -> bool:
        return verdict.require(
            req.headers.get("kbn-xsrf") is not None, "kbn-xsrf header",
            "no kbn-xsrf header (Kibana: 400 Request must contain a kbn-xsrf header)",
        )

    def _export(
        self, req: http.server.BaseHTTPRequestHandler, url: urllib.parse.SplitResult,
        body: bytes, verdict: Verdict,
    ) -> tuple[int, str, bytes]:
        xsrf = self._xsrf(req, verdict)
        json_body = verdict.require(
            req.headers.get_content_type() == "application/json" and not url.query,
            "Content-Type application/json, no query",
            f"Content-Type {req.headers.get('Content-Type')!r} / query {url.query!r}",
        )
        try:
            request = json.loads(body)
        except ValueError:
            request = None
        allowed = {"objects", "type", "includeReferencesDeep", "excludeExportDetails",
                   "hasReference", "search"}
        objects = request.get("objects") if isinstance(request, dict) else None
        keys = (
            [_key(o) for o in objects]
            if isinstance(objects, list) and all(isinstance(o, dict) and set(o) == {"type", "id"}
                                                 for o in objects)
            else None
        )
        shape = verdict.require(
            isinstance(request, dict) and set(request) <= allowed and keys is not None
            and request.get("includeReferencesDeep") is False
            and request.get("excludeExportDetails") is True,
            "body {objects: [{type, id}], includeReferencesDeep: false, "
            "excludeExportDetails: true}",
            f"export body {body[:200]!r} is not the documented shape",
        )
        wanted = verdict.require(
            keys is not None and sorted(keys) == sorted(self.expected),
            f"asks for the {len(self.expected)} managed objects by type/id",
            f"asks for {keys}, not the managed objects",
        )
        if not (xsrf and json_body and shape and wanted):
            return 400, "application/json", _error(400, "Bad Request", "invalid export request")
        assert keys is not None
        missing = [k for k in keys if k not in self.objects]
        if missing:
            verdict.checks.append(f"answered 400: {len(missing)} objects not found")
            return 400, "application/json", json.dumps({
                "statusCode": 400, "error": "Bad Request",
                "message": "Error fetching objects to export",
                "attributes": {"objects": [
                    {"id": i, "type": t, "error": {
                        "statusCode": 404, "error": "Not Found",
                        "message": f"Saved object [{t}/{i}] not found"}}
                    for t, i in missing]},
            }).encode()
        verdict.checks.append(f"answered 200: {len(keys)} objects as ndjson")
        lines = [json.dumps(self.objects[k]) for k in keys]
        return 200, "application/ndjson", ("\n".join(lines) + "\n").encode()

    def _import(
        self, req: http.server.BaseHTTPRequestHandler, url: urllib.parse.SplitResult,
        body: bytes, verdict: Verdict,
    ) -> tuple[int, str, bytes]:
        xsrf = self._xsrf(req, verdict)
        query = verdict.require(
            urllib.parse.parse_qs(url.query) == {"overwrite": ["true"]},
            "query overwrite=true (and nothing else)",
            f"query {url.query!r} is not overwrite=true",
        )
        text = self._ndjson_part(req, body, verdict)
        if text is None or not (xsrf and query):
            return 400, "application/json", _error(400, "Bad Request", "invalid import request")
        # Kibana splits the file on \n and JSON.parse()s each non-blank line; the \r of the
        # CRLF line ends multipart bodies get is JSON whitespace to it.
        ends = "CRLF (JSON whitespace to Kibana)" if "\r\n" in text else "LF"
        verdict.checks.append(f"ndjson lines end in {ends}")
        objects: list[dict[str, Any]] = []
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                objects.append(json.loads(line))
            except ValueError as exc:
                verdict.violations.append(f"ndjson line {n} is not JSON: {exc}")
                return 400, "application/json", _error(400, "Bad Request", str(exc))
        dangling = check_ndjson(objects, self.expected, self.index, self.objects, verdict)
        results, errors = [], []
        now = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        for obj in objects:
            key = _key(obj)
            meta = {"title": obj.get("attributes", {}).get("title", ""), "icon": "app"}
            if key in dangling:
                errors.append({"id": key[1], "type": key[0], "meta": meta, "error": {
                    "type": "missing_references",
                    "references": [{"type": r["type"], "id": r["id"]} for r in obj["references"]
                                   if (r["type"], r["id"]) not in self.objects
                                   and (r["type"], r["id"]) not in
                                   {_key(o) for o in objects}]}})
                continue
            existed = key in self.objects
            self.objects[key] = obj | {
                "version": self._next_version(), "updated_at": now,
                "created_at": self.objects.get(key, {}).get("created_at", now),
                "managed": False, "namespaces": [self.space or "default"],
            }
            results.append({"type": key[0], "id": key[1], "meta": meta}
                           | ({"overwrite": True} if existed else {}))
        answer: dict[str, Any] = {"successCount": len(results), "success": not errors,
                                  "warnings": [], "successResults": results}
        if errors:
            answer["errors"] = errors
        verdict.checks.append(
            f"answered 200 success={not errors} successCount={len(results)}"
            + (f" ({sum('overwrite' in r for r in results)} overwritten)" if results else "")
        )
        return 200, "application/json", json.dumps(answer).encode()

    def _ndjson_part(
        self, req: http.server.BaseHTTPRequestHandler, body: bytes, verdict: Verdict
    ) -> str | None:
        ctype = req.headers.get("Content-Type", "")
        if not verdict.require(
            req.headers.get_content_type() == "multipart/form-data"
            and req.headers.get_param("boundary") is not None,
            "Content-Type multipart/form-data with a boundary",
            f"Content-Type {ctype!r} is not multipart/form-data",
        ):
            return None
        message = email.message_from_bytes(
            f"Content-Type: {ctype}\r\n\r\n".encode() + body, policy=email.policy.HTTP
        )
        parts = list(message.iter_parts()) if message.is_multipart() else []
        if not verdict.require(
            len(parts) == 1 and parts[0].get_param("name", header="content-disposition") == "file",
            "one form part, named file",
            f"form parts {[p.get_param('name', header='content-disposition') for p in parts]}"
            " are not exactly one named file",
        ):
            return None
        part = parts[0]
        filename = part.get_filename() or ""
        ok_name = verdict.require(
            filename.endswith(".ndjson"), f"filename {filename} (.ndjson)",
            f"filename {filename!r} (Kibana: 415 Unsupported file extension)",
        )
        ok_cte = verdict.require(
            part.get("Content-Transfer-Encoding") is None, "raw ndjson, no transfer encoding",
            f"Content-Transfer-Encoding {part.get('Content-Transfer-Encoding')} (Kibana reads "
            "the bytes as they are)",
        )
        payload = part.get_payload(decode=False)
        return payload if ok_name and ok_cte and isinstance(payload, str) else None


def _error(code: int, error: str, message: str) -> bytes:
    return json.dumps({"statusCode": code, "error": error, "message": message}).encode()


# --- running the role's tasks ------------------------------------------------------------------

PLAY = {
    "name": "The kibana role's API tasks (as tasks/main.yml runs them)",
    "hosts": "kibana",
    "gather_facts": False,
    "tasks": [
        {
            "name": "Wait for Kibana",
            "ansible.builtin.include_role": {"name": "kibana", "tasks_from": "status.yml"},
        },
        {
            "name": "Saved objects",
            "ansible.builtin.include_role": {"name": "kibana", "tasks_from": "saved_objects.yml"},
        },
    ],
}


def _run(
    tmp: Path, stub: KibanaContract, certs: Path, extra: dict[str, Any] | None = None,
    roles: Path = TOP / "roles",
) -> subprocess.CompletedProcess[str]:
    (tmp / "inventory").write_text(
        "[kibana]\nlocalhost ansible_connection=local"
        f" ansible_python_interpreter={sys.executable}\n"
    )
    (tmp / "play.yml").write_text(yaml.safe_dump([PLAY], sort_keys=False))
    variables = {
        "kibana_api_password": API_PASSWORD,
        "kibana_server_port": stub.port,
        "kibana_cert_dir": str(certs),  # ca.crt there, where roles/pki puts it
        "kibana_data_dir": str(tmp / "kibana-data"),
        "kibana_status_timeout": 10,
    } | (extra or {})
    (tmp / "kibana-data").mkdir(exist_ok=True)
    (tmp / "vars.json").write_text(json.dumps(variables))
    env = ansible_env(tmp) | {"ANSIBLE_ROLES_PATH": str(roles)}
    proc = subprocess.run(
        [ANSIBLE_PLAYBOOK, "-i", str(tmp / "inventory"), str(tmp / "play.yml"),
         "-e", f"@{tmp / 'vars.json'}"],
        cwd=TOP, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert API_PASSWORD not in proc.stdout + proc.stderr, "the API password was printed"
    return proc


def _changed(proc: subprocess.CompletedProcess[str]) -> int:
    match = re.search(r"localhost\s+:.*changed=(\d+)", proc.stdout.split("PLAY RECAP")[-1])
    assert match, proc.stdout[-3000:]
    return int(match.group(1))


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, Issued]:
    """The test CA as <kibana_cert_dir>/ca.crt and a certificate for 127.0.0.1 it signed."""
    ca = TestCA(tmp_path / "certs")
    return ca.dir, ca.issue("kibana")


def test_saved_objects_contract(tmp_path: Path, tls: tuple[Path, Issued]) -> None:
    """First run: the export finds nothing, the import brings all six objects, a second export
    records their versions (changed). Second run: the export finds them at the recorded
    versions and nothing is imported (changed=0). An edit made in Kibana brings the import back.
    Every request is one the contract allows."""
    certs, cert = tls
    stub = KibanaContract(cert)
    try:
        first = _run(tmp_path, stub, certs)
        assert first.returncode == 0, first.stdout[-4000:]
        assert _changed(first) > 0
        assert stub.requests() == [("GET", "status"), ("POST", "_export"),
                                   ("POST", "_import"), ("POST", "_export")]
        assert sorted(stub.objects) == sorted(managed_objects())
        record = json.loads((tmp_path / "kibana-data" / "logpipe-saved-objects.json").read_text())
        assert record["space"] == "" and len(record["checksum"]) == 64
        assert sorted(tuple(o[:2]) for o in record["objects"]) == sorted(managed_objects())
        assert [o[2] for o in sorted(record["objects"])] == [
            stub.objects[(t, i)]["version"] for t, i, _ in sorted(record["objects"])
        ]

        second = _run(tmp_path, stub, certs)
        assert second.returncode == 0, second.stdout[-4000:]
        assert _changed(second) == 0, second.stdout[-4000:]
        assert stub.requests()[4:] == [("GET", "status"), ("POST", "_export")]

        # Someone saves the dashboard in Kibana: the next run puts the file's version back.
        stub.edit_in_kibana("dashboard", "logpipe-web-logs-dashboard")
        third = _run(tmp_path, stub, certs)
        assert third.returncode == 0, third.stdout[-4000:]
        assert _changed(third) > 0
        assert stub.requests()[6:] == [("GET", "status"), ("POST", "_export"),
                                       ("POST", "_import"), ("POST", "_export")]
        assert _changed(_run(tmp_path, stub, certs)) == 0
    finally:
        stub.close()
    # The list the closing note quotes: `pytest -s -k test_saved_objects_contract` prints it;
    # the file next to it has every check of every object.
    print("\nRequests the Kibana contract stub received:\n" + stub.report())
    (tmp_path / "kibana-contract-requests.txt").write_text(stub.report(detail=True) + "\n")
    assert not stub.violations, "\n".join(stub.violations)


def test_saved_objects_contract_space_prefix_and_index(
    tmp_path: Path, tls: tuple[Path, Issued]
) -> None:
    """A space, an id prefix and another logpipe index: the calls go to /s/<space>/, the ids
    and the data view's title follow."""
    certs, cert = tls
    expected = managed_objects("team-a")
    stub = KibanaContract(cert, space="ops", index="shop-logs", expected=expected)
    extra = {"kibana_saved_objects_space": "ops", "kibana_saved_objects_id_prefix": "team-a",
             "logpipe_elasticsearch_index": "shop-logs"}
    try:
        first = _run(tmp_path, stub, certs, extra)
        assert first.returncode == 0, first.stdout[-4000:]
        assert sorted(stub.objects) == sorted(expected)
        view = stub.objects[("index-pattern", "team-a-web-logs")]["attributes"]
        assert view["title"] == "shop-logs*" and view["timeFieldName"] == "indexed_at"
        assert _changed(_run(tmp_path, stub, certs, extra)) == 0
    finally:
        stub.close()
    assert not stub.violations, "\n".join(stub.violations)


def test_contract_stub_fails_a_dangling_reference(
    tmp_path: Path, tls: tuple[Path, Issued]
) -> None:
    """The contract catches a broken file: a copy of the role whose dashboard points one panel
    at a visualization the file does not hold. Kibana answers success=false with a
    missing_references error, the role stops on it, and the stub records the violation."""
    certs, cert = tls
    roles = tmp_path / "roles"
    shutil.copytree(ROLE, roles / "kibana")
    template = roles / "kibana" / "templates" / "saved-objects.ndjson.j2"
    text = template.read_text()
    broken = text.replace("('errors', ids.error_rate,", "('errors', ids.error_rate ~ '-gone',")
    assert broken != text
    template.write_text(broken)
    stub = KibanaContract(cert)
    try:
        proc = _run(tmp_path, stub, certs, roles=roles)
    finally:
        stub.close()
    assert proc.returncode != 0
    out = " ".join(proc.stdout.split())
    assert "Kibana did not import all saved objects (5 of 6)" in out, out[-3000:]
    assert "missing_references" in out
    assert any(
        "reference errors:panel_errors -> lens logpipe-error-rate-gone resolves to nothing" in v
        for v in stub.violations
    ), stub.report()
    assert not (tmp_path / "kibana-data" / "logpipe-saved-objects.json").exists()
