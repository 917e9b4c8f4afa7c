"""The schemas are the single source: valid, with valid examples, and the whole OpenAPI document."""
import json

import jsonschema
import pytest
from openapi_spec_validator import validate_spec
from openapi_spec_validator.validation import openapi_v31_spec_validator

import ozwell

REGISTRY = ozwell.SchemaRegistry.load()


def test_schemas_are_found_as_package_data():
    assert {"Error", "ErrorResponse", "Model", "ListModelsResponse", "HealthResponse"} <= set(REGISTRY.schemas)


@pytest.mark.parametrize("name", sorted(REGISTRY.schemas))
def test_schema_is_valid_against_its_metaschema(name):
    schema = REGISTRY.schemas[name]
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema.get("title") == name


@pytest.mark.parametrize("name", sorted(REGISTRY.schemas))
def test_schema_examples_validate(name):
    examples = REGISTRY.schemas[name].get("examples")
    assert examples, f"{name} has no examples"
    for example in examples:
        assert list(REGISTRY.errors(name, example)) == []


def test_every_file_reference_resolves():
    def references(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref":
                    yield value
                else:
                    yield from references(value)
        elif isinstance(node, list):
            for item in node:
                yield from references(item)
    for name, schema in REGISTRY.schemas.items():
        for ref in references(schema):
            target = ref.partition("#")[0]
            if target:
                assert target.removesuffix(".json") in REGISTRY.schemas, f"{name} -> {ref}"


@pytest.fixture(scope="module")
def document():
    return ozwell.build_openapi(ozwell.ROUTES, REGISTRY)


def test_document_is_valid_openapi_3_1(document):
    assert document["openapi"] == "3.1.0"
    validate_spec(document, validator=openapi_v31_spec_validator)


def test_every_route_and_method_is_documented_from_the_route_table(document):
    for route in ozwell.ROUTES:
        if not route.in_openapi:
            continue
        item = document["paths"][route.openapi_path]
        assert set(item) == set(route.handler.api), route.template
        for method, operation in route.handler.api.items():
            spec = item[method]
            assert "200" in spec["responses"]
            for status in operation.errors:
                assert spec["responses"][str(status)]["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"}
            for name in route.path_parameters:
                assert {"name": name, "in": "path", "required": True,
                        "schema": {"type": "string"}} in spec["parameters"]
            if operation.request:
                assert spec["requestBody"]["content"][operation.request_media]["schema"] == {
                    "$ref": f"#/components/schemas/{operation.request}"}
            if operation.stream:
                assert "text/event-stream" in spec["responses"]["200"]["content"]
            assert ("security" in spec) == route.handler.requires_auth


def test_components_are_the_schema_files_with_references_rewritten(document):
    components = document["components"]["schemas"]
    assert set(components) == set(REGISTRY.schemas)
    text = json.dumps(components)
    assert '.json"' not in text and '"$schema"' not in text
    assert components["ListModelsResponse"]["properties"]["data"]["items"] == {
        "$ref": "#/components/schemas/Model"}


def test_route_templates_become_patterns():
    route = ozwell.Route("/v1/files/{file_id}/content", ozwell.HealthHandler)
    assert route.pattern == r"/v1/files/(?P<file_id>[^/]+)/content"
    assert route.openapi_path == "/v1/files/{file_id}/content"
    assert ozwell.Route("/v1/models/{model:path}", ozwell.HealthHandler).openapi_path == "/v1/models/{model}"


@pytest.mark.gen_test
async def test_served_document_is_the_built_one(http_client, base_url, document):
    reply = await http_client.fetch(f"{base_url}/openapi.json")
    assert json.loads(reply.body) == document
