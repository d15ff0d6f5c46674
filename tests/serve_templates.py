"""Chat templates for the serve tests.

QWEN3_CODER_STYLE follows the structure of the chat template Qwen publishes with Qwen3-Coder
(read through the search tool, rewritten here, not copied): a system turn that lists the tools
as ``<tools><function><name>/<description>/<parameters>`` XML with the schema's extra keys as
tags, the ``<tool_call><function=NAME><parameter=ARG>`` calling convention, earlier assistant
calls rendered from ``tool_call.arguments|items`` (mappings and lists through ``tojson``, other
values through ``string``), and consecutive tool results grouped into one user turn of
``<tool_response>`` blocks. The wording of the instructions is ours.
"""

QWEN3_CODER_STYLE = r"""{% macro extra_tags(obj, skip) %}
    {%- if obj is mapping %}
        {%- for key in obj if key not in skip %}
            {%- set val = obj[key] %}
            {%- if val is mapping or (val is sequence and val is not string) %}
                {{- '\n<' ~ key ~ '>' ~ (val | tojson | safe) ~ '</' ~ key ~ '>' }}
            {%- else %}
                {{- '\n<' ~ key ~ '>' ~ (val | string) ~ '</' ~ key ~ '>' }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
{% endmacro %}
{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined or tools is none %}
    {%- set tools = [] %}
{%- endif %}
{%- if system_message is defined %}
    {{- "<|im_start|>system\n" + system_message }}
{%- elif tools | length > 0 %}
    {{- "<|im_start|>system\nYou are a coding assistant that can call tools." }}
{%- endif %}
{%- if tools | length > 0 %}
    {{- "\n\n# Tools\n\n<tools>" }}
    {%- for tool in tools %}
        {%- if tool.function is defined %}
            {%- set tool = tool.function %}
        {%- endif %}
        {{- "\n<function>\n<name>" ~ tool.name ~ "</name>" }}
        {%- if tool.description is defined %}
            {{- "\n<description>" ~ (tool.description | trim) ~ "</description>" }}
        {%- endif %}
        {{- "\n<parameters>" }}
        {%- if tool.parameters is defined and tool.parameters is mapping and tool.parameters.properties is defined and tool.parameters.properties is mapping %}
            {%- for pname, pfields in tool.parameters.properties | items %}
                {{- "\n<parameter>\n<name>" ~ pname ~ "</name>" }}
                {%- if pfields.type is defined %}
                    {{- "\n<type>" ~ (pfields.type | string) ~ "</type>" }}
                {%- endif %}
                {%- if pfields.description is defined %}
                    {{- "\n<description>" ~ (pfields.description | trim) ~ "</description>" }}
                {%- endif %}
                {{- extra_tags(pfields, ["name", "type", "description"]) }}
                {{- "\n</parameter>" }}
            {%- endfor %}
        {%- endif %}
        {{- extra_tags(tool.parameters, ["type", "properties"]) }}
        {{- "\n</parameters>" }}
        {{- extra_tags(tool, ["type", "name", "description", "parameters"]) }}
        {{- "\n</function>" }}
    {%- endfor %}
    {{- "\n</tools>\n\nTo call a tool, answer with nothing after the call:\n<tool_call>\n<function=NAME>\n<parameter=ARG>\nVALUE\n</parameter>\n</function>\n</tool_call>" }}
{%- endif %}
{%- if system_message is defined or tools | length > 0 %}
    {{- "<|im_end|>\n" }}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message.role == "assistant" and message.tool_calls is defined and message.tool_calls is iterable and message.tool_calls | length > 0 %}
        {{- "<|im_start|>" + message.role }}
        {%- if message.content is defined and message.content is string and message.content | trim | length > 0 %}
            {{- "\n" + message.content | trim + "\n" }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- "\n<tool_call>\n<function=" + tool_call.name + ">\n" }}
            {%- if tool_call.arguments is defined %}
                {%- for arg_name, arg_value in tool_call.arguments | items %}
                    {{- "<parameter=" + arg_name + ">\n" }}
                    {%- set arg_value = arg_value | tojson | safe if arg_value is mapping or (arg_value is sequence and arg_value is not string) else arg_value | string %}
                    {{- arg_value }}
                    {{- "\n</parameter>\n" }}
                {%- endfor %}
            {%- endif %}
            {{- "</function>\n</tool_call>" }}
        {%- endfor %}
        {{- "<|im_end|>\n" }}
    {%- elif message.role in ["user", "system", "assistant"] %}
        {{- "<|im_start|>" + message.role + "\n" + message.content + "<|im_end|>\n" }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- "<|im_start|>user\n" }}
        {%- endif %}
        {{- "<tool_response>\n" + message.content + "\n</tool_response>\n" }}
        {%- if loop.last or loop.nextitem.role != "tool" %}
            {{- "<|im_end|>\n" }}
        {%- endif %}
    {%- else %}
        {{- raise_exception("unexpected message role " + message.role) }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- "<|im_start|>assistant\n" }}
{%- endif %}
"""
