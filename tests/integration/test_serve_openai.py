"""`tramontane serve` through the real `openai` client against live servers on loopback: tiny random
checkpoints with real mistral_common tokenizer files, and one model rigged to write a tool call, so that every
answer can be compared with what mistral_common encodes and the library generates."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2 as httpx
import numpy as np
import openai
import pytest
import soundfile
import torch
from mistral_common.protocol.instruct.chunk import TextChunk
from mistral_common.protocol.instruct.messages import UserMessage
from PIL import Image
from safetensors.torch import save_file

from tests.integration.serve_fixtures import (  # noqa: F401 - one_torch_thread applies to the module
    ARGS,
    LiveServer,
    one_torch_thread,
    rigged_checkpoint,
    tekken_tokenizer,
    text_checkpoint,
    wait_idle,
)
from tests.unit.test_audio import SR, audio_tokenizer, tiny_voxtral, tone, write_consolidated  # noqa: F401
from tests.unit.test_vision import random_vlm, tiny_text_args, tiny_vision_args
from tramontane.accounting import DpSgdEvent, PrivacyLedger, PrivacyStatement
from tramontane.errors import CheckpointError
from tramontane.finetune.adapter import save_adapter
from tramontane.finetune.lora import LoraConfig, add_lora
from tramontane.finetune.run import PRIVACY_FILE, FinetuneConfig, privacy_record
from tramontane.generation import SamplingParams, generate
from tramontane.generation.multimodal import generate_with_audio, generate_with_images, transcribe
from tramontane.models.audio import audio_chunk, audio_features, load_audio
from tramontane.models.checkpoint import load_model
from tramontane.models.vision import encode_image_chat, image_message
from tramontane.serve.app import create_app
from tramontane.serve.engine import EngineConfig
from tramontane.serve.loading import ServedModel, load_served_model
from tramontane.serve.tools import CALL_ID_PATTERN, mistral_call_id
from tramontane.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
MAX_MODEL_LEN = 256


def client_for(url: str, api_key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return text_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", Tokenizer.builtin("v3"),
                           file_name="tokenizer.model.v3")


@pytest.fixture(scope="module")
def text_server(text_dir: Path) -> Iterator[tuple[openai.OpenAI, ServedModel, LiveServer]]:
    served = load_served_model(text_dir)
    app = create_app(served, engine_config=EngineConfig(max_batch=8, max_model_len=MAX_MODEL_LEN))
    with LiveServer(app) as server:
        yield client_for(server.url), served, server


def library(served: ServedModel, prompt: list[int], **params) -> tuple[list[int], str, list[float] | None]:
    params.setdefault("max_tokens", 8)
    [out] = generate(served.model, [prompt], SamplingParams(**params), eos_id=served.tokenizer.eos_id)
    return out.tokens, out.finish_reason, out.logprobs


# -- chat and completions -------------------------------------------------------------------------------------


def test_chat_equals_the_library_greedy_with_logprobs_and_usage(text_server) -> None:
    client, served, _ = text_server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The wind from the north"}]
    response = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0,
                                              logprobs=True, top_logprobs=3)
    prompt = served.tokenizer.encode_chat(messages)
    tokens, reason, logprobs = library(served, prompt, logprobs=True)
    [choice] = response.choices
    assert choice.message.content == served.tokenizer.decode(tokens)
    assert choice.finish_reason == reason and choice.message.tool_calls is None
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == len(tokens) + (reason == "stop")
    got = choice.logprobs.content
    assert [t.logprob for t in got] == pytest.approx(logprobs, abs=1e-4)
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in got)
    assert b"".join(bytes(t.bytes) for t in got).decode(errors="replace").strip() == choice.message.content.strip()


def test_streamed_chat_equals_non_streamed(text_server) -> None:
    client, _, _ = text_server
    request = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me about the sea."}],
               "max_tokens": 10, "temperature": 0}
    whole = client.chat.completions.create(**request)
    chunks = list(client.chat.completions.create(**request, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_completions_of_text_and_of_token_ids(text_server) -> None:
    client, served, _ = text_server
    tokenizer = served.tokenizer
    prompt = tokenizer.encode("The wind from the north", bos=True)
    tokens, reason, _ = library(served, prompt, max_tokens=6)
    by_text = client.completions.create(model="tiny", prompt="The wind from the north", max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, logprobs=2)
    expected = tokenizer.decode(prompt + tokens)[len(tokenizer.decode(prompt)):]  # continues the prompt's text
    assert by_text.choices[0].text == by_ids.choices[0].text == expected
    assert by_ids.choices[0].finish_reason == reason and by_ids.usage.prompt_tokens == len(prompt)
    logprobs = by_ids.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(tokens)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    streamed = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == expected


def test_n_choices_are_seeded_draws(text_server) -> None:
    client, served, _ = text_server
    messages = [{"role": "user", "content": "Pick words."}]
    request = {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 1.0, "top_p": 0.9, "seed": 11,
               "n": 2}
    first, again = client.chat.completions.create(**request), client.chat.completions.create(**request)
    prompt = served.tokenizer.encode_chat(messages)
    for i in range(2):  # choice i is the library's draw with seed + i
        tokens, _, _ = library(served, prompt, max_tokens=6, temperature=1.0, top_p=0.9, seed=11 + i)
        assert first.choices[i].message.content == again.choices[i].message.content
        assert first.choices[i].message.content == served.tokenizer.decode(tokens)
    assert first.choices[0].message.content != first.choices[1].message.content
    assert first.usage.completion_tokens > 6


def test_stop_strings_cut_the_text_and_end_the_request(text_server) -> None:
    client, _, _ = text_server
    request = {"model": "tiny", "messages": [{"role": "user", "content": "Count."}], "temperature": 0}
    base = client.chat.completions.create(**request, max_tokens=16).choices[0].message.content
    stop = base[len(base) // 2: len(base) // 2 + 3]
    expected = base[: base.index(stop)]
    cut = client.chat.completions.create(**request, max_tokens=16, stop=[stop, "never appears"])
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    assert cut.usage.completion_tokens < 16
    streamed = client.chat.completions.create(**request, max_tokens=16, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_over_long_prompt_is_a_400_naming_the_limit(text_server) -> None:
    client, _, _ = text_server
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "wind " * 400}])
    assert str(MAX_MODEL_LEN) in err.value.message and "max_model_len" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt="hello", max_tokens=1000)
    assert f"max_model_len={MAX_MODEL_LEN}" in err.value.message
    assert err.value.body["code"] == "context_length_exceeded"


def test_bad_requests_are_clear_4xx(text_server) -> None:
    client, _, _ = text_server
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError, match="presence_penalty"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                       presence_penalty=1.0)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    with pytest.raises(openai.BadRequestError, match="does not read images"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}])


# -- tools ----------------------------------------------------------------------------------------------------


def round_trip(client: openai.OpenAI, tokenizer: Tokenizer, model: str) -> None:
    """An OpenAI-style conversation (long call ids) with a call and its result: the server's prompt is
    mistral_common's for the same chat with the ids mapped."""
    call_id = "call_9F3kq2LxYzWvB8sT0pAeRmN"
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": call_id, "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": call_id, "content": '{"sky": "clear"}'}]
    response = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=4,
                                              temperature=0)
    mapped = json.loads(json.dumps(messages).replace(call_id, mistral_call_id(call_id)))
    assert response.usage.prompt_tokens == len(tokenizer.encode_chat(mapped, TOOLS))
    assert response.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_tool_round_trip_v3(text_server) -> None:
    client, served, _ = text_server
    round_trip(client, served.tokenizer, "tiny")


def test_tool_round_trip_v7(tmp_path: Path) -> None:
    path = text_checkpoint(tmp_path / "tiny7", Tokenizer.builtin("v7"), file_name="tokenizer.model.v7")
    served = load_served_model(path)
    with LiveServer(create_app(served, engine_config=EngineConfig(max_model_len=MAX_MODEL_LEN))) as server:
        round_trip(client_for(server.url), served.tokenizer, "tiny7")


@pytest.fixture(scope="module")
def rigged(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[openai.OpenAI, ServedModel]]:
    """A v11 model that answers every chat with `[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}` (greedy)."""
    tokenizer = tekken_tokenizer("v11", tmp_path_factory.mktemp("tok") / "tekken.json")
    end_inst = tokenizer.encode_chat([{"role": "user", "content": "x"}])[-1]
    call = [9, *tokenizer.encode("get_weather", bos=False), ARGS, *tokenizer.encode('{"city": "Paris"}', bos=False)]
    path = rigged_checkpoint(tmp_path_factory.mktemp("rigged") / "rigged", tokenizer,
                             [end_inst, *call, tokenizer.eos_id], "tekken.json")
    served = load_served_model(path)
    with LiveServer(create_app(served, engine_config=EngineConfig(max_model_len=MAX_MODEL_LEN))) as server:
        yield client_for(server.url), served


def test_a_generated_tool_call_end_to_end(rigged) -> None:
    client, served = rigged
    messages = [{"role": "user", "content": "What is the weather in Paris?"}]
    response = client.chat.completions.create(model="rigged", messages=messages, tools=TOOLS, temperature=0)
    [choice] = response.choices
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and CALL_ID_PATTERN.match(call.id)
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    # Streamed: the client merges the deltas by index into the same call.
    chunks = list(client.chat.completions.create(model="rigged", messages=messages, tools=TOOLS, temperature=0,
                                                 stream=True))
    deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].id is not None and deltas[0].function.name == "get_weather" and deltas[0].type == "function"
    assert len(deltas) > 2 and all(d.index == 0 and d.id is None for d in deltas[1:])
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["tool_calls"]
    assert all(not c.choices[0].delta.content for c in chunks)

    # The round trip: the call and its result go back; the server's prompt is mistral_common's.
    history = messages + [{"role": "assistant", "tool_calls": [call.model_dump()]},
                          {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    again = client.chat.completions.create(model="rigged", messages=history, tools=TOOLS, temperature=0)
    assert again.usage.prompt_tokens == len(served.tokenizer.encode_chat(history, TOOLS))
    assert again.choices[0].message.tool_calls[0].id != call.id  # a fresh id for a new call


def test_tool_choice_none_named_and_required(rigged) -> None:
    client, _ = rigged
    messages = [{"role": "user", "content": "Weather?"}]
    none = client.chat.completions.create(model="rigged", messages=messages, tools=TOOLS, tool_choice="none",
                                          temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason == "stop"
    assert none.choices[0].message.content == 'get_weather{"city": "Paris"}'  # control tokens are not text
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        response = client.chat.completions.create(model="rigged", messages=messages, tools=TOOLS,
                                                  tool_choice=choice, temperature=0)
        [call] = response.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model="rigged", messages=messages, tools=TOOLS, tool_choice={
            "type": "function", "function": {"name": "other"}})


def test_tool_round_trip_v11(rigged) -> None:
    client, served = rigged
    round_trip(client, served.tokenizer, "rigged")


# -- images and audio -----------------------------------------------------------------------------------------


def test_an_image_through_a_tiny_pixtral(tmp_path: Path) -> None:
    tokenizer = Tokenizer.builtin("v7-mm")
    encoder = tokenizer.mistral.instruct_tokenizer.image_encoder
    ids, config = encoder.special_ids, encoder.image_config
    model = random_vlm(tiny_text_args(vocab_size=tokenizer.vocab_size, dim=32, head_dim=8),
                       tiny_vision_args(patch_size=config.image_patch_size, image_size=128, image_token_id=ids.img,
                                        image_break_token_id=ids.img_break, image_end_token_id=ids.img_end), seed=5)
    path = tmp_path / "pixtral"
    path.mkdir()
    (path / "params.json").write_text(json.dumps({**model.args.to_params(),
                                                  "vision_encoder": model.vision_args.to_params()}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / "consolidated.safetensors"))
    shutil.copy(tokenizer.path, path / tokenizer.path.name)
    picture = Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 70, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()

    with pytest.raises(CheckpointError, match="load_vision_language_model"):
        load_model(path)  # the text-only loader names the right one
    served = load_served_model(path)
    assert served.kind == "vision"
    with LiveServer(create_app(served, engine_config=EngineConfig(max_model_len=512))) as server:
        client = client_for(server.url)
        response = client.chat.completions.create(model="pixtral", max_tokens=5, temperature=0, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                         {"type": "text", "text": "Describe it."}]}])
        tokens, images = encode_image_chat(tokenizer, [image_message("Describe it.", [picture])])
        [expected] = generate_with_images(served.model, [tokens], [images], SamplingParams(max_tokens=5),
                                          eos_id=tokenizer.eos_id)
        assert response.choices[0].message.content == tokenizer.decode(expected.tokens)
        assert response.usage.prompt_tokens == len(tokens) and tokens.count(ids.img) > 0
        with pytest.raises(openai.BadRequestError, match="allow-remote-media"):
            client.chat.completions.create(model="pixtral", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}]}])
        with pytest.raises(openai.BadRequestError, match="cannot read"):
            client.chat.completions.create(model="pixtral", messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,bm90IGFuIGltYWdl"}}]}])


def test_a_transcription_by_a_tiny_voxtral(audio_tokenizer, tmp_path: Path) -> None:  # noqa: F811
    model = tiny_voxtral(vocab_size=audio_tokenizer.vocab_size, seed=3)
    path = write_consolidated(model, tmp_path / "voxtral")
    shutil.copy(audio_tokenizer.path, path / "tekken.json")
    with pytest.raises(CheckpointError, match="load_voxtral"):
        load_model(path)
    wav = tmp_path / "speech.wav"
    soundfile.write(wav, tone(3.0), SR, subtype="FLOAT")
    served = load_served_model(path)
    assert served.kind == "audio"
    with LiveServer(create_app(served, engine_config=EngineConfig(max_model_len=1024))) as server:
        client = client_for(server.url)
        with wav.open("rb") as f:
            text = client.audio.transcriptions.create(model="voxtral", file=f, language="fr",
                                                      extra_body={"max_tokens": 4}).text
        expected = transcribe(model, audio_tokenizer, load_audio(wav), language="fr",
                              params=SamplingParams(max_tokens=4))
        assert text == expected
        # Audio in a chat: the same prompt and embeddings as the library's.
        data = base64.b64encode(wav.read_bytes()).decode()
        response = client.chat.completions.create(model="voxtral", max_tokens=4, temperature=0, messages=[
            {"role": "user", "content": [{"type": "input_audio", "input_audio": {"data": data, "format": "wav"}},
                                         {"type": "text", "text": "What is this?"}]}])
        tokenized = audio_tokenizer.encode_chat_full([UserMessage(content=[
            audio_chunk(load_audio(wav)), TextChunk(text="What is this?")])])
        features = torch.cat([audio_features(a, model.audio_args) for a in tokenized.audios])
        [chat] = generate_with_audio(model, [tokenized.tokens], [features], SamplingParams(max_tokens=4),
                                     eos_id=audio_tokenizer.eos_id)
        assert response.choices[0].message.content == audio_tokenizer.decode(chat.tokens)
        assert response.usage.prompt_tokens == len(tokenized.tokens)
        with wav.open("rb") as f, pytest.raises(openai.BadRequestError, match="ISO 639-1"):
            client.audio.transcriptions.create(model="voxtral", file=f, language="klingon")
        with pytest.raises(openai.BadRequestError, match="cannot decode"):
            client.audio.transcriptions.create(model="voxtral", file=("a.wav", b"not audio"))


def test_transcription_needs_a_voxtral(text_server, tmp_path: Path) -> None:
    client, _, _ = text_server
    wav = tmp_path / "speech.wav"
    soundfile.write(wav, tone(0.5), SR, subtype="FLOAT")
    with wav.open("rb") as f, pytest.raises(openai.BadRequestError, match="Voxtral"):
        client.audio.transcriptions.create(model="tiny", file=f)


# -- access, load and privacy ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded(text_dir: Path) -> Iterator[tuple[str, ServedModel, object]]:
    """The text model behind an API key, one sequence at a time and one waiting."""
    served = load_served_model(text_dir)
    app = create_app(served, api_key="s3cret", engine_config=EngineConfig(
        max_batch=1, max_queue=1, max_step_tokens=64, max_model_len=MAX_MODEL_LEN))
    with LiveServer(app) as server:
        yield server.url, served, app.state.engine


def test_api_key_guards_everything_but_health(guarded) -> None:
    url, _, _ = guarded
    with pytest.raises(openai.AuthenticationError) as err:
        client_for(url, "wrong").models.list()
    assert err.value.status_code == 401 and err.value.body["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200
    for path in ("/metrics", "/v1/models", "/openapi.json"):
        response = httpx.get(f"{url}{path}")
        assert response.status_code == 401 and set(response.json()["error"]) == {"message", "type", "param",
                                                                                 "code"}
    assert [m.id for m in client_for(url, "s3cret").models.list().data] == ["tiny"]
    assert httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_a_full_queue_is_a_429_and_leaves_nothing_behind(guarded) -> None:
    url, _, engine = guarded
    client = client_for(url, "s3cret")
    with pytest.raises(openai.RateLimitError) as err:  # n=3: one runs, one waits, the third is refused
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], n=3,
                                       max_tokens=50)
    assert err.value.status_code == 429 and "retry later" in err.value.message
    wait_idle(engine)  # the two accepted choices were cancelled with the request
    response = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=2)
    assert response.choices[0].finish_reason in ("stop", "length")


def test_metrics_are_prometheus_text(guarded) -> None:
    url, _, _ = guarded
    text = httpx.get(f"{url}/metrics", headers={"Authorization": "Bearer s3cret"}).text
    for name in ("tramontane_requests_queued 0", "tramontane_requests_running 0",
                 "# TYPE tramontane_time_to_first_token_seconds histogram",
                 'tramontane_time_to_first_token_seconds_bucket{le="+Inf"}', "tramontane_generation_tokens_per_second"):
        assert name in text


def test_a_dp_adapters_privacy_is_in_models_and_its_card(text_server, text_dir: Path, tmp_path: Path) -> None:
    model, _ = load_model(text_dir)
    lora = LoraConfig(rank=2, alpha=4)
    add_lora(model, lora)
    ledger = PrivacyLedger([DpSgdEvent(sample_rate=0.01, noise_multiplier=1.1, steps=200)])
    record = privacy_record(ledger, FinetuneConfig(epsilon=3.0, delta=1e-6))
    adapter = save_adapter(model, tmp_path / "adapter", lora, extra_json={PRIVACY_FILE: record})
    served = load_served_model(text_dir, adapter=adapter, name="tiny-dp")
    statement = PrivacyStatement.of(ledger, 1e-6, "rdp", target_epsilon=3.0)
    with LiveServer(create_app(served, engine_config=EngineConfig(max_model_len=MAX_MODEL_LEN))) as server:
        [card] = httpx.get(f"{server.url}/v1/models").json()["data"]
        assert card["id"] == "tiny-dp" and card["max_model_len"] == MAX_MODEL_LEN
        assert card["privacy"] == {"epsilon": pytest.approx(statement.epsilon), "delta": 1e-6,
                                   "privacy_unit": "example", "accountant": "rdp",
                                   "card": "/v1/models/tiny-dp/privacy"}
        full = httpx.get(f"{server.url}{card['privacy']['card']}").json()
        assert full["card"]["epsilon_rdp"] == pytest.approx(statement.epsilon_rdp)
        assert full["card"]["delta"] == 1e-6 and "mi_advantage_bound" in full["card"]
        assert full["ledger"] == ledger.to_dict()
        assert httpx.get(f"{server.url}/v1/models/other/privacy").status_code == 404
        response = client_for(server.url).chat.completions.create(
            model="tiny-dp", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
        assert response.choices[0].message.content is not None
    client, _, server = text_server  # a model without a ledger has no card
    assert httpx.get(f"{server.url}/v1/models/tiny/privacy").status_code == 404
    assert client.models.retrieve("tiny").model_extra.get("privacy") is None


# -- the command ----------------------------------------------------------------------------------------------


def test_the_serve_command_serves_until_terminated(text_dir: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2] / "src"), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "tramontane.cli", "serve", "--model", str(text_dir), "--port",
                             str(port), "--api-key", "k3y", "--max-model-len", "128", "--max-batch", "4"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "tramontane serve did not come up"
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        client = client_for(url, "k3y")
        [card] = client.models.list().data
        assert card.id == "tiny" and card.model_extra["max_model_len"] == 128
        response = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  max_tokens=3, temperature=0)
        assert response.choices[0].finish_reason in ("stop", "length")
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    # uvicorn shuts down gracefully (the lifespan stops the engine), then re-raises SIGTERM to exit with it
    assert proc.returncode in (0, -signal.SIGTERM) and "Traceback" not in err, err
    assert f"serving 'tiny' on http://127.0.0.1:{port}/v1 (API key required)" in err


def test_a_bad_serve_option_is_refused_before_the_model_is_read(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from tramontane.cli import main

    assert main(["serve", "--model", str(tmp_path / "absent"), "--max-batch", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-batch" in err and "absent" not in err
    assert main(["serve", "--model", str(tmp_path / "absent")]) == 2
    assert "absent" in capsys.readouterr().err
