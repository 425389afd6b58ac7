"""Start a local 3-node mesh in this process and query it with the official `openai` client.

Run it:  python examples/openai_local_cluster.py

Every node serves an OpenAI-compatible API; any of them can take the request. The
answer's `mesh` object says which nodes computed which layers.
"""

from __future__ import annotations

import asyncio

from openai import AsyncOpenAI

import mesh


async def main() -> None:
    async with mesh.local_cluster(3) as cluster:
        base_url = cluster.api_url(0) + "/v1"
        print(f"3 nodes ready; OpenAI API at {base_url}")
        client = AsyncOpenAI(base_url=base_url, api_key="not-needed-on-loopback")

        models = await client.models.list()
        print("models:", [m.id for m in models.data])

        reply = await client.chat.completions.create(
            model="smollm2-135m", max_tokens=32,
            messages=[{"role": "user", "content": "Give me one tip for a tidy kitchen."}])
        print("answer:", reply.choices[0].message.content)
        print("usage:", reply.usage.model_dump())
        for stage in reply.model_extra["mesh"]["pipeline"]:
            print(f"  layers {stage['layers'][0]}-{stage['layers'][1] - 1} on node {stage['node'][:8]}")

        print("streamed: ", end="", flush=True)
        stream = await client.chat.completions.create(
            model="smollm2-135m", max_tokens=32, stream=True,
            messages=[{"role": "user", "content": "Name a planet."}])
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()


if __name__ == "__main__":
    from actors import log

    log.configure(format="console", level="WARNING")  # the mesh's own logs: warnings only
    asyncio.run(main())
