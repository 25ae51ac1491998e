"""Call a running grace-serve app from Python through its DeploymentHandle."""

import sys

from ray import serve


def main(app_name: str = "llm"):
    handle = serve.get_app_handle(app_name)
    request = {
        "model": "tiny-llama",
        "messages": [{"role": "user", "content": "What does NVLink-C2C connect?"}],
        "max_tokens": 16,
    }
    # One answer, shaped like the HTTP API's JSON body. `user` keeps this user's KV cache.
    reply = handle.chat.remote(request, user="alice").result()
    print(reply["choices"][0]["message"]["content"], reply["usage"])

    # Streaming: the chunks the HTTP API sends as server-sent events (last one has usage).
    chunks = list(handle.options(stream=True).chat_stream.remote(request, user="alice"))
    print("".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]))
    return reply, chunks


if __name__ == "__main__":
    main(*sys.argv[1:2])  # the app's name, if not "llm"
