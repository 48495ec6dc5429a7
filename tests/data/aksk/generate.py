#!/usr/bin/env python3
"""Generate AK/SK (SDK-HMAC-SHA256) signing test vectors with Huawei Cloud's own Python SDK.

Nothing here re-implements the signing algorithm. Every expected value comes out of the
installed `huaweicloudsdkcore` package:

  * requests are the SDK's own `SdkRequest` objects;
  * path parameters are percent-encoded by the SDK's own `Client._parse_path_params`
    and query parameters are flattened by `Client._parse_query_params`;
  * signing is done by `BasicCredentials.sign_request`, the function the SDK's client
    submits for every request (`Credentials.process_auth_request`); it adds X-Project-Id /
    X-Security-Token and then runs the SDK's `Signer.sign`;
  * `canonical_request` and `string_to_sign` are not returned by `Signer.sign`, so the
    SDK's own internal helpers `Signer._process_canonical_request` and
    `Signer._process_string_to_sign` are wrapped to record what they return *during* the
    real `sign()` call;
  * two vectors go through the complete official client path (`huaweicloudsdkaom`
    `AomClient.stop_execution`, i.e. the SDK's "StopExecution" = terminate call), stopped
    just before the HTTP request would be sent.

The date is fixed by replacing `datetime` in the signer module with a subclass whose
`utcnow()` returns SDK_DATE, so the SDK still adds X-Sdk-Date itself. As a cross-check each
signer-level vector is signed a second time with the SDK's other supported way of fixing the
date (an `X-Sdk-Date` header already present), and both signatures must agree.

Usage (see README.md beside this file):
    python3 -m venv /tmp/sdkvenv
    /tmp/sdkvenv/bin/pip install huaweicloudsdkcore==3.1.219 huaweicloudsdkaom==3.1.219
    /tmp/sdkvenv/bin/python tests/data/aksk/generate.py      # writes vectors.json beside it
"""

import copy
import datetime as _dt
import functools
import json
import os
import sys
import tempfile

# Importing the SDK creates $HOME/.huaweicloud/application_id (used for its User-Agent).
# Keep that side effect out of the real home directory.
_real_home = os.environ.get("HOME")
_tmp_home = tempfile.TemporaryDirectory()
os.environ["HOME"] = _tmp_home.name

from importlib.metadata import version as pkg_version  # noqa: E402

from huaweicloudsdkcore.auth.credentials import BasicCredentials  # noqa: E402
from huaweicloudsdkcore.client import Client, ClientBuilder  # noqa: E402
from huaweicloudsdkcore.http.http_config import HttpConfig  # noqa: E402
from huaweicloudsdkcore.sdk_request import SdkRequest  # noqa: E402
from huaweicloudsdkcore.signer import signer as sdk_signer_module  # noqa: E402
from huaweicloudsdkcore.signer.signer import Signer  # noqa: E402
from huaweicloudsdkaom.v1 import AomClient, StopExecutionRequest  # noqa: E402

if _real_home is None:
    del os.environ["HOME"]
else:
    os.environ["HOME"] = _real_home

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vectors.json")

SDK_DATE = "20261127T101500Z"
_FIXED_NOW = _dt.datetime.strptime(SDK_DATE, "%Y%m%dT%H%M%SZ")

# Obviously fake credentials.
AK = "AKTESTEXAMPLE0000001"
SK = "SKtestEXAMPLEsecretKEY0000000000000000001"
AK_TMP = "AKTESTEXAMPLETMP0002"
SK_TMP = "SKtestEXAMPLEtemporarySECRET00000000002"
TOKEN = "FAKE-SECURITY-TOKEN.gQpjbi1ub3J0aC00.not-a-real-token+/="
PROJECT = "0123456789abcdef0123456789abcdef"  # 32 chars, like a real project id

HOST = "aom.cn-north-4.myhuaweicloud.com"
TERMINATE = "/v1/{project_id}/cms/workflow/{workflow_id}/executions/{execution_id}/terminate"


# --------------------------------------------------------------------------------------
# Fixed clock: the signer module calls `datetime.utcnow()` when no X-Sdk-Date header is set.
class _FixedDatetime(_dt.datetime):
    @classmethod
    def utcnow(cls):
        return _FIXED_NOW


sdk_signer_module.datetime = _FixedDatetime

# --------------------------------------------------------------------------------------
# Record the SDK's intermediate values while its real sign() runs.
_RECORD = {}


def _spy(name):
    original = getattr(Signer, name)

    @functools.wraps(original)
    def wrapper(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        _RECORD[name] = result
        return result

    setattr(Signer, name, wrapper)


for _name in ("_process_canonical_request", "_process_string_to_sign",
              "_process_canonical_uri", "_process_hash_payload",
              "_sign_string_to_sign"):
    _spy(_name)
_orig_signed_headers = Signer._process_signed_headers


def _signed_headers_spy(request):
    result = _orig_signed_headers(request)
    _RECORD["_process_signed_headers"] = list(result)
    return result


Signer._process_signed_headers = staticmethod(_signed_headers_spy)

# --------------------------------------------------------------------------------------
# A real SDK client, used only for its path/query helpers (no network is touched).
_cfg = HttpConfig.get_default_config()
_cfg.user_agent = ""  # keep the SDK's User-Agent deterministic (no platform info)
_helper_client = (ClientBuilder(Client).with_http_config(_cfg)
                  .with_credentials(BasicCredentials(AK, SK, PROJECT))
                  .with_endpoint("https://" + HOST).build())


def _credentials(ak, sk, project_id, security_token):
    cred = BasicCredentials(ak, sk, project_id)
    if security_token is not None:
        cred = cred.with_security_token(security_token)
    return cred


def _sign_once(method, host, resource_path, query, headers, body, cred):
    """Sign one SdkRequest with the SDK; return (signed request, recorded intermediates)."""
    _RECORD.clear()
    req = SdkRequest(method=method, schema="https", host=host, resource_path=resource_path,
                     query_params=[tuple(kv) for kv in query], header_params=dict(headers),
                     body=body if body != "" else None)
    cred.sign_request(req)
    return req, dict(_RECORD)


def _expected(req, rec, caller_headers):
    final_headers = dict(req.header_params)
    return {
        "canonical_uri": rec["_process_canonical_uri"],
        "canonical_query_string": Signer.process_canonical_query_string(req),
        "payload_hash": rec["_process_hash_payload"],
        "canonical_request": rec["_process_canonical_request"],
        "string_to_sign": rec["_process_string_to_sign"],
        "signed_headers": ";".join(rec["_process_signed_headers"]),
        "signature": rec["_sign_string_to_sign"],
        "authorization": final_headers["Authorization"],
        # every header the SDK added (including Host and Authorization)
        "headers_added": {k: v for k, v in final_headers.items() if k not in caller_headers},
        # every header as the SDK hands it to `requests` (caller values are strip()ped)
        "headers_sent": final_headers,
        # request-target as sent on the wire: path, then '?' + the canonical query string
        "uri": req.uri,
    }


def signer_vector(name, *, method="POST", host=HOST, template=TERMINATE, path_params=None,
                  query=(), headers=None, body="", ak=AK, sk=SK, project_id=PROJECT,
                  security_token=None, note=None):
    """A vector produced by SdkRequest + BasicCredentials.sign_request (Signer.sign)."""
    path_params = dict(path_params or {})
    headers = dict(headers or {})
    query = [list(kv) for kv in query]

    # Raw (unencoded) path segments, as the SDK's template substitution sees them.
    all_params = dict(path_params)
    if project_id:
        all_params["project_id"] = project_id
    raw_segments = []
    for seg in template.strip("/").split("/"):
        if seg.startswith("{") and seg.endswith("}"):
            raw_segments.append(all_params[seg[1:-1]])
        else:
            raw_segments.append(seg)

    # The SDK's own path encoding: quote(str(v), safe='') for each path parameter;
    # {project_id} comes from BasicCredentials.get_update_path_params().
    cred = _credentials(ak, sk, project_id, security_token)
    resource_path = _helper_client._parse_path_params({}, dict(path_params), template,
                                                      cred.get_update_path_params())
    sdk_query = _helper_client._parse_query_params({}, [tuple(kv) for kv in query])

    req, rec = _sign_once(method, host, resource_path, sdk_query, headers, body, cred)

    # Cross-check: the SDK also accepts a preset X-Sdk-Date header; it must give the same result.
    req2, _ = _sign_once(method, host, resource_path, sdk_query, {**headers, "X-Sdk-Date": SDK_DATE},
                         body, _credentials(ak, sk, project_id, security_token))
    assert req2.header_params["Authorization"] == req.header_params["Authorization"], name
    assert req.header_params["X-Sdk-Date"] == SDK_DATE, name

    v = {
        "name": name,
        "source": "signer",
        "method": method,
        "host": host,
        "path": resource_path,
        "path_segments_raw": raw_segments,
        "query": query,
        "headers": headers,
        "body": body,
        "ak": ak,
        "sk": sk,
        "project_id": project_id,
        "security_token": security_token,
        "sdk_date": SDK_DATE,
        "note": note,
        "expected": _expected(req, rec, headers),
    }
    return v


class _Captured(Exception):
    pass


def aom_client_vector(name, *, endpoint, workflow_id, execution_id, ak=AK, sk=SK,
                      project_id=PROJECT, security_token=None, note=None):
    """A vector produced by the official AomClient.stop_execution, stopped before sending."""
    cfg = HttpConfig.get_default_config()
    cfg.user_agent = ""  # => User-Agent is exactly the SDK's fixed "huaweicloud-usdk-python/3.0"
    cred = _credentials(ak, sk, project_id, security_token)
    client = (AomClient.new_builder().with_http_config(cfg).with_credentials(cred)
              .with_endpoint(endpoint).build())
    captured = {}
    sdk_request_init = SdkRequest.__init__

    def capture_init(self, *args, **kwargs):
        sdk_request_init(self, *args, **kwargs)
        # headers as the SDK client set them before signing (copy: signing mutates the dict)
        captured["pre_headers"] = dict(self.header_params)

    def fake_send(request):
        captured["request"] = request
        captured["record"] = dict(_RECORD)
        raise _Captured()

    client._do_http_request_sync = fake_send
    SdkRequest.__init__ = capture_init
    _RECORD.clear()
    try:
        client.stop_execution(StopExecutionRequest(workflow_id=workflow_id, execution_id=execution_id))
    except _Captured:
        pass
    finally:
        SdkRequest.__init__ = sdk_request_init
    req = captured["request"]
    rec = captured["record"]
    pre = captured["pre_headers"]
    raw_segments = ["v1", project_id, "cms", "workflow", workflow_id, "executions", execution_id,
                    "terminate"]
    v = {
        "name": name,
        "source": "huaweicloudsdkaom AomClient.stop_execution",
        "method": req.method,
        "host": req.host,
        "path": req.resource_path,
        "path_segments_raw": raw_segments,
        "query": [list(kv) for kv in (req.query_params or [])],
        "headers": pre,
        "body": "" if not req.body else req.body.decode("utf-8"),
        "ak": ak,
        "sk": sk,
        "project_id": project_id,
        "security_token": security_token,
        "sdk_date": SDK_DATE,
        "note": note,
        "expected": _expected(req, rec, pre),
    }
    return v


JSON = {"Content-Type": "application/json"}


def ids(wf, ex):
    return {"workflow_id": wf, "execution_id": ex}


VECTORS = [
    signer_vector(
        "terminate_plain_ids_empty_body",
        path_params=ids("wf-0001", "ex-0001"), headers=JSON),
    signer_vector(
        "terminate_without_project_header",
        note="credentials without project_id: no X-Project-Id header; project id given as a path parameter",
        path_params={"project_id": PROJECT, **ids("wf-0001", "ex-0001")}, headers=JSON,
        project_id=None),
    signer_vector(
        "terminate_ids_need_encoding",
        note="space, +, é, ~, *, % inside ids",
        path_params=ids("wf 1+é~", "ex*%41"), headers=JSON),
    signer_vector(
        "terminate_id_with_slash",
        note="'/' inside an id is %2F on the wire, but the canonical URI unquotes the whole path "
             "and splits on '/', so it becomes a real '/' there",
        path_params=ids("wf/a", "ex/b%2Fc"), headers=JSON),
    signer_vector(
        "terminate_body_empty_object",
        path_params=ids("wf-0001", "ex-0001"), headers=JSON, body="{}"),
    signer_vector(
        "terminate_body_json_a_b",
        path_params=ids("wf-0001", "ex-0001"), headers=JSON, body='{"a":"b"}'),
    signer_vector(
        "terminate_body_non_ascii",
        note="the body hash is SHA-256 of the UTF-8 bytes",
        path_params=ids("wf-0001", "ex-0001"), headers=JSON, body='{"reason":"终止 é"}'),
    signer_vector(
        "terminate_security_token",
        note="temporary credentials: X-Security-Token is added and signed",
        path_params=ids("wf-0001", "ex-0001"), headers=JSON,
        ak=AK_TMP, sk=SK_TMP, security_token=TOKEN),
    signer_vector(
        "terminate_security_token_without_project_header",
        path_params={"project_id": PROJECT, **ids("wf-0001", "ex-0001")}, headers=JSON,
        ak=AK_TMP, sk=SK_TMP, project_id=None, security_token=TOKEN),
    signer_vector(
        "terminate_host_with_port",
        note="Host is signed exactly as the endpoint's netloc, port included",
        host="127.0.0.1:18443", path_params=ids("wf-0001", "ex-0001"), headers=JSON),
    signer_vector(
        "terminate_host_with_default_port",
        note="an explicit :443 stays in the signed Host value (the SDK sends that Host header)",
        host=HOST + ":443", path_params=ids("wf-0001", "ex-0001"), headers=JSON),
    signer_vector(
        "get_query_unsorted_empty_and_encoded_values",
        method="GET", template="/v1/{project_id}/cms/workflow/{workflow_id}/executions",
        path_params={"workflow_id": "wf-0001"},
        query=[["offset", "0"], ["limit", "10"], ["name", "a b+c/d=e&f~g*h%é"], ["empty", ""],
               ["Zeta", "1"], ["tag", "z"], ["tag", "a"], ["tag", ""], ["a b", "x"]],
        headers=JSON),
    signer_vector(
        "get_query_sorted_by_raw_key",
        note="sorting is on the raw (unencoded) (key, value) tuples: 'Z' (0x5A) before '[' (0x5B) "
             "although '%5B' < 'Z'; 'é' after '~' although '%C3%A9' < '~'",
        method="GET", template="/v1/{project_id}/cms/workflows",
        query=[["[", "1"], ["Z", "2"], ["é", "3"], ["~", "4"], ["a", "5"]]),
    signer_vector(
        "get_no_content_type_no_body",
        note="no Content-Type: only host and x-sdk-date (and x-project-id) are signed",
        method="GET", template="/v1/{project_id}/cms/workflows", query=[["limit", "1"]]),
    signer_vector(
        "get_path_with_trailing_slash",
        note="the canonical URI gets a '/' appended only when it does not already end with one",
        method="GET", template="/v1/{project_id}/cms/workflows/", headers=JSON),
    signer_vector(
        "terminate_extra_headers_trim_case_underscore",
        note="header names are lower-cased, values strip()ped (inner spaces kept); a header "
             "whose name contains '_' is sent but not signed; a caller-set Host is kept",
        path_params=ids("wf-0001", "ex-0001"),
        headers={"Content-Type": "application/json;charset=UTF-8", "X-Custom-Header": "  a  b  ",
                 "X_Not_Signed": "ignored", "HOST": HOST},
        body='{"a":"b"}'),
    signer_vector(
        "terminate_non_json_content_type_unsigned_payload",
        note="a Content-Type not starting with application/json or application/bson makes the SDK "
             "add X-Sdk-Content-Sha256: UNSIGNED-PAYLOAD and use that literal as the body hash",
        path_params=ids("wf-0001", "ex-0001"), headers={"Content-Type": "text/plain"},
        body="hello"),
    signer_vector(
        "terminate_non_json_content_type_empty_body",
        note="UNSIGNED-PAYLOAD header is still added, but an empty body always hashes to SHA-256('')",
        path_params=ids("wf-0001", "ex-0001"), headers={"Content-Type": "text/plain"}),
    aom_client_vector(
        "aom_client_stop_execution",
        note="the official SDK call for this API: no body, Content-Type application/json, the SDK's "
             "User-Agent, X-Project-Id",
        endpoint="https://" + HOST, workflow_id="wf-0001", execution_id="ex-0001"),
    aom_client_vector(
        "aom_client_stop_execution_encoded_ids_port_token",
        endpoint="https://127.0.0.1:18443", workflow_id="wf 1+é~/x", execution_id="ex*%41",
        ak=AK_TMP, sk=SK_TMP, security_token=TOKEN),
]


def main():
    names = [v["name"] for v in VECTORS]
    assert len(names) == len(set(names)), "duplicate vector names"
    doc = {
        "sdk": "huaweicloudsdkcore",
        "version": pkg_version("huaweicloudsdkcore"),
        "aom_sdk": "huaweicloudsdkaom",
        "aom_sdk_version": pkg_version("huaweicloudsdkaom"),
        "algorithm": "SDK-HMAC-SHA256",
        "vectors": VECTORS,
    }
    with open(OUT, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=2)
        f.write("\n")
    print("wrote %d vectors to %s" % (len(VECTORS), OUT))


if __name__ == "__main__":
    main()
