#!/usr/bin/env python3
"""Expected chat-template renderings for the C++ Jinja subset (tests/data/generate/chat_templates.json).

The templates below are the "chat_template" strings of the published tokenizer_config.json files,
written down from our knowledge of them (meta-llama/Llama-2-7b-chat-hf, meta-llama/Meta-Llama-3-8B-Instruct,
meta-llama/Llama-3.1-8B-Instruct, mistralai/Mistral-7B-Instruct-v0.1, Qwen/Qwen2-7B-Instruct,
Qwen/Qwen2.5-7B-Instruct); small differences from the files on the Hub would not weaken the test,
which checks that the C++ renderer and Jinja2 agree on the same template text. Three more templates
exercise trim_blocks / lstrip_blocks and the rest of the subset, and two use constructs outside it
("unsupported": the C++ renderer must fail with an error naming the construct).

Rendering mimics transformers' apply_chat_template: ImmutableSandboxedEnvironment(trim_blocks=True,
lstrip_blocks=True, extensions=[loopcontrols]), a tojson filter that is json.dumps(ensure_ascii=False),
raise_exception and strftime_now globals; variables messages, bos_token, eos_token,
add_generation_prompt. Needs only jinja2 (Debian: python3-jinja2). Run from the repository root:
    python3 scripts/make_chat_goldens.py
"""
import json
import os

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
          "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
          "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
          "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
          "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
          "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")

LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}"
          "{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")

LLAMA31 = """{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\\n\\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

MISTRAL = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
           "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
           "{{ message['content'] + eos_token + ' ' }}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}")

QWEN2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
         "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
         "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# trim_blocks / lstrip_blocks without any "-" whitespace control.
BLOCKS = """{% for m in messages %}
    {% if m.role == 'user' %}
User: {{ m.content }}
    {% else %}
{{ m.role|capitalize }}: {{ m.content }}
    {% endif %}
  {# a comment on its own line #}
{% endfor %}
{% if add_generation_prompt %}
Assistant:{% endif %}"""

# The rest of the subset: namespace, loop variables, slices, filters, tests, for-else / if filter,
# break / continue, dict literals and items(), string methods, arithmetic and comparisons.
MISC = """{%- set ns = namespace(n_user=0, last='') -%}
{%- for m in messages if m.role != 'system' -%}
{%- if m.role == 'user' %}{% set ns.n_user = ns.n_user + 1 %}{% endif -%}
[{{ loop.index }}/{{ loop.length }}{{ ' first' if loop.first }}{{ ' last' if loop.last else '' }}] {{ m.content[:5] ~ '|' ~ m.content[-3:] | upper }}
{% set ns.last = m.role %}
{%- else -%}
no messages
{%- endfor -%}
users={{ ns.n_user }} last={{ ns.last }} n={{ messages | length }} {{ [7 // 2, 7 % 3, 2 ** 3, 7 / 2, -3 // 2, -7 % 3, 7.0 // 2, 2 * 1.5, 1 - 0.25] }}
{% for i in range(10) %}{% if i is odd %}{% continue %}{% endif %}{% if i > 6 %}{% break %}{% endif %}{{ i }},{% endfor %}
{{ {'a': 1, 'b': [true, none, 'x"y\u00e9']} | tojson }} {% for k, v in {'k': 'v', 'n': 2}.items() %}{{ k }}={{ v }};{% endfor %} {{ 'assistant' in messages | map(attribute='role') | list if false else 'ok' }} {{ 'y' in 'xyz' }} {{ 3 not in [1, 2] }}
{{ '  pad  '.strip() }}|{{ 'a,b,,c'.split(',') }}|{{ 'Hello'.startswith('He') }}|{{ 'x' * 3 }}|{{ undefined_var is defined }}|{{ undefined_var | default('dflt') }}
{{ messages[0].content.replace('e', 'E') if messages else '' }}{{ messages | first | tojson if false }}
{%- if messages[0]['role'] == 'system' and not (messages | length) < 2 %} sys:{{ messages[0].content | trim | lower }}{% endif %}
"""

UNSUPPORTED_TAG = "{% macro greet(name) %}Hello {{ name }}{% endmacro %}{{ greet('x') }}"
UNSUPPORTED_FILTER = "{% for m in messages %}{{ m.content | wordcount }}{% endfor %}"

TEMPLATES = [
    ("llama-2", "meta-llama/Llama-2-7b-chat-hf tokenizer_config.json", LLAMA2),
    ("llama-3", "meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json", LLAMA3),
    ("llama-3.1", "meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json", LLAMA31),
    ("mistral", "mistralai/Mistral-7B-Instruct-v0.1 tokenizer_config.json", MISTRAL),
    ("qwen2", "Qwen/Qwen2-7B-Instruct tokenizer_config.json", QWEN2),
    ("qwen2.5", "Qwen/Qwen2.5-7B-Instruct tokenizer_config.json", QWEN25),
    ("blocks", "gptqkit test: trim_blocks / lstrip_blocks", BLOCKS),
    ("misc", "gptqkit test: the rest of the subset", MISC),
    ("unsupported-tag", "gptqkit test: macro is outside the subset", UNSUPPORTED_TAG, "macro"),
    ("unsupported-filter", "gptqkit test: wordcount is outside the subset", UNSUPPORTED_FILTER, "wordcount"),
]

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, who are you?"}],
    [{"role": "system", "content": "  You are terse.\n"}, {"role": "user", "content": " What is 2+2? "}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a joke about \"quotes\" and émojis 🎉."}],
    [{"role": "assistant", "content": "I speak first."}],  # roles out of order: some templates raise
]

BOS, EOS = "<s>", "</s>"


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def main():
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    out = {"jinja2": jinja2.__version__, "bos_token": BOS, "eos_token": EOS, "templates": []}
    for name, source, text, *unsupported in TEMPLATES:
        entry = {"name": name, "source": source, "template": text, "cases": []}
        if unsupported:  # Jinja2 renders it; the C++ subset must refuse it, naming this construct
            entry["unsupported"] = unsupported[0]
        for conv in CONVERSATIONS:
            for agp in (True, False):
                case = {"messages": conv, "add_generation_prompt": agp}
                try:
                    case["expected"] = env.from_string(text).render(messages=conv, bos_token=BOS, eos_token=EOS,
                                                                    add_generation_prompt=agp)
                except Exception as e:  # the C++ renderer must fail too
                    case["error"] = f"{type(e).__name__}: {e}"
                entry["cases"].append(case)
        out["templates"].append(entry)
    path = os.path.join("tests", "data", "generate", "chat_templates.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(out, f, indent=1, ensure_ascii=False)
        f.write("\n")
    print(f"wrote {path}: {sum(len(t['cases']) for t in out['templates'])} cases")


if __name__ == "__main__":
    main()
