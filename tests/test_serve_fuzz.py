"""``convret serve`` fuzzed from its own OpenAPI schema with schemathesis (in the test extra): requests that fit
the schema and requests that do not, with the API key, against a server on 127.0.0.1; a bounded number of
examples per operation (derandomized, so that CI runs the same ones)."""
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")

from _serve_world import AppServer, build_world  # noqa: E402

KEY = "fuzz-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 30


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("serve-fuzz"))


@pytest.fixture(scope="module")
def fuzzed_server(world):
    from convret.serve.app import ServeSettings, create_app
    from convret.serve.service import SearchService

    service = SearchService.load(world["model"], world["index"], world["collection"], cache_mb=1)
    app = create_app(service, ServeSettings(api_keys=[KEY]))
    with AppServer(app) as url:
        yield url


@pytest.mark.parametrize("method,path,mode", [
    *[(m, p, mode) for m, p in (("POST", "/v1/search"), ("POST", "/v1/encode")) for mode in ("positive", "negative")],
    ("GET", "/healthz", "positive"), ("GET", "/metrics", "positive")])  # no parameters: nothing to make invalid
def test_requests_generated_from_the_openapi_schema(fuzzed_server, method, path, mode):
    """Requests generated from the service's own schema (schemathesis; bodies that fit it and bodies that do
    not, with the API key): never a 5xx, every answer's status, content type and body as the schema says."""
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode, checks

    schema = schemathesis.openapi.from_url(fuzzed_server + "/openapi.json", headers=AUTH)
    operation = schema[path][method]
    operations = {f"{result.ok().method.upper()} {result.ok().path}" for result in schema.get_all_operations()}
    assert operations == {"POST /v1/search", "POST /v1/encode", "GET /healthz", "GET /metrics"}, operations

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=GenerationMode(mode)))
    def check(case):
        case.call_and_validate(headers=AUTH, timeout=30,
                               checks=[checks.not_a_server_error, checks.status_code_conformance,
                                       checks.content_type_conformance, checks.response_schema_conformance])

    check()
