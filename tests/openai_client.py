"""The official `openai` Python client against a running mamba-serve.

Usage: python tests/openai_client.py BASE_URL MODEL
Run by the integration test `serving::the_openai_python_client_works`.
"""

import sys

import openai


def main() -> None:
    base_url, model = sys.argv[1], sys.argv[2]
    client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0)

    models = client.models.list()
    assert [m.id for m in models.data] == [model], models

    # Completions, plain and streamed, greedy: the same text.
    c = client.completions.create(model=model, prompt="The quick", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    text = c.choices[0].text
    assert c.object == "text_completion" and c.choices[0].finish_reason == "length", c
    assert c.usage.completion_tokens == 12 and c.usage.total_tokens == c.usage.prompt_tokens + 12, c.usage
    pieces, finish, usage = [], None, None
    for chunk in client.completions.create(model=model, prompt="The quick", max_tokens=12, temperature=0,
                                           stream=True, stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == text, (pieces, text)
    assert finish == "length" and usage is not None and usage.completion_tokens == 12, (finish, usage)

    # Chat, plain and streamed.
    messages = [{"role": "user", "content": "Say hello"}]
    r = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    reply = r.choices[0].message.content
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "length", r
    streamed = "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
        model=model, messages=messages, max_tokens=10, temperature=0, stream=True,
        extra_body={"ignore_eos": True}) if ch.choices)
    assert streamed == reply, (streamed, reply)

    # Errors surface as the client's typed exceptions.
    try:
        client.completions.create(model=model, prompt="x", temperature=5)
        raise AssertionError("temperature 5 was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "temperature" in str(e), e
    try:
        client.completions.create(model="not-served", prompt="x")
        raise AssertionError("an unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404, e
    print("openai client: all checks passed")


if __name__ == "__main__":
    main()
