"""An openai-SDK agent: one chat completion every 2 seconds, through HTTP(S)_PROXY.

The SDK is configured by the environment alone (OPENAI_BASE_URL, the proxy variables);
when the firewall kills the agent, the SDK gets a 403 with the firewall's JSON reason.
"""

import time

import openai

client = openai.OpenAI(max_retries=0)
while True:
    try:
        reply = client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "ping"}]
        )
        print("ok:", reply.choices[0].message.content, flush=True)
    except openai.APIStatusError as exc:
        print(f"refused {exc.status_code}: {exc.response.text}", flush=True)
    except openai.APIConnectionError as exc:
        print(f"no connection: {exc}", flush=True)
    time.sleep(2)
