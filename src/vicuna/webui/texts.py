"""The web UI's words in English and Simplified Chinese, and the choice between them for a request.

One choice, made on the server from the request's Accept-Language header, serves the whole page: the
handlers build their status lines and errors in it, and the page's load event puts its labels, buttons
and placeholders in it (the page is drawn in English, and is in Chinese a moment later). Gradio's own
`gr.I18n` is not used: it translates only the labels sent with the page (not what handlers return),
and it picks its locale from `navigator.language` among Gradio's own locales only, so a browser set to
`zh` or `zh-Hans` got English there. Gradio's own few words (an error toast's title, the copy button's
tooltip) follow Gradio's choice. No torch, no Gradio here.
"""

from __future__ import annotations

# The English texts are the keys; `{name}` fields are filled in after the choice.
ZH = {
    # the page
    "API key": "API 密钥",
    "This server needs an API key": "此服务器需要 API 密钥",
    "Enter": "确定",
    "Message": "消息",
    "Type a message and press Enter": "输入消息，按 Enter 发送",
    "Send": "发送",
    "Stop": "停止",
    "Regenerate": "重新生成",
    "Clear": "清空",
    "System prompt": "系统提示词",
    "Empty: the model's own default.": "留空则使用模型自带的默认提示词。",
    "Temperature": "温度",
    "Top-p": "Top-p",
    "Max new tokens": "最多生成 token 数",
    "Lowered, when need be, to the room the context window leaves.": "必要时降到上下文窗口剩余的长度。",
    "You:": "你：",  # whose a message is, said to screen readers
    "Assistant:": "助手：",
    # the handlers
    "**Invalid API key.** Try again.": "**API 密钥无效。** 请重试。",
    "A valid API key is needed: enter it at the top of the page.": "需要有效的 API 密钥：请在页面顶部输入。",
    "{name} must be a number from {low:g} to {high:g} (it is {value}).": (
        "{name}必须是 {low:g} 到 {high:g} 之间的数（当前为 {value}）。"
    ),
    "The message makes a prompt of {tokens} tokens, but the model's context window is {window} tokens: "
    "shorten it.": "这条消息构成的提示有 {tokens} 个 token，但模型的上下文窗口只有 {window} 个 token：请缩短它。",
    "The message and the system prompt make a prompt of {tokens} tokens, but the model's context window "
    "is {window} tokens: shorten one of them.": (
        "这条消息和系统提示词构成的提示有 {tokens} 个 token，但模型的上下文窗口只有 {window} 个 token：请缩短其中之一。"
    ),
    "The message or the system prompt holds a lone UTF-16 surrogate, which is no character: send text.": (
        "消息或系统提示词中有单独的 UTF-16 代理项，它不是字符：请发送文字。"
    ),
    "Writing the reply… **Stop** ends it. What you type meanwhile waits in the box: press Enter when "
    "the reply is done.": "正在生成回复…… 按 **停止** 可中止。此时输入的内容会留在输入框里，回复完成后按 Enter 发送。",
    "The last reply was cut short: its page was reloaded or closed while it was written. **Regenerate** "
    "writes it again.": "上一条回复未写完：生成时页面被刷新或关闭。按 **重新生成** 可重新生成。",
    "The GPU ran out of memory for this reply (beside the others being generated). Try again shortly, "
    "or with a shorter conversation (Clear).": (
        "GPU 显存不足，无法生成这条回复（其他回复也在生成中）。请稍后重试，或缩短对话（清空）。"
    ),
    # errors of the server's (`vicuna.errors`)
    "The server is busy with other replies: try again shortly.": "服务器正忙于生成其他回复：请稍后重试。",
    "the server is shutting down; retry the request": "服务器正在关闭：请在它重新启动后重试。",
    # the stats line under the chat
    "{count} tokens": "{count} 个 token",
    "{rate:.1f} tokens/s": "{rate:.1f} token/秒",
    "first token {seconds:.2f} s": "首个 token {seconds:.2f} 秒",
    "stopped": "已停止",
    "context window full": "上下文窗口已满",
    "max tokens reached": "已达最多生成 token 数",
    "the oldest {count} exchange(s) left out to fit the context window": (
        "为放入上下文窗口，省略了最早的 {count} 轮对话"
    ),
}


# The page's `lang` attribute in each language, by which a screen reader picks its voice.
HTML_LANG = {"en": "en", "zh": "zh-CN"}


def language(accept_language: str | None) -> str:
    """`zh` where the browser prefers Simplified Chinese (`zh`, `zh-CN`, `zh-SG`, `zh-Hans…`) to English
    (`en…`), else `en`: the first of the two in the header's order of preference (its q values; equal ones
    in the order written). Other languages, and Traditional Chinese (`zh-Hant…`, `zh-TW`, `zh-HK`, `zh-MO`), are
    passed over; none of the two, or no header: `en`."""
    ranked = []
    for position, item in enumerate((accept_language or "").split(",")):
        tag, *params = (part.strip() for part in item.split(";"))
        q = 1.0
        for param in params:
            if param.lower().startswith("q="):
                try:
                    q = float(param[2:])
                except ValueError:
                    q = 0.0  # a malformed weight: the tag is passed over
        if tag and q > 0:
            ranked.append((-q, position, tag.lower()))
    for _, _, tag in sorted(ranked):
        subtags = tag.split("-")
        if subtags[0] == "en":
            return "en"
        if subtags[0] == "zh" and ("hans" in subtags or not {"hant", "tw", "hk", "mo"} & set(subtags)):
            return "zh"
    return "en"


def say(lang: str, text: str, **fields: object) -> str:
    """`text` (English, as written in the code) in `lang`, its `{name}` fields filled in from `fields`."""
    template = ZH.get(text, text) if lang == "zh" else text
    return template.format(**fields) if fields else template
