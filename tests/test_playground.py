"""The playground page `gptcli serve` answers GET / with, driven in real headless chromium (selenium) against a
server subprocess with a tiny checkpoint: the streamed, coloured tokens must be the API's own (text and
log-probabilities of the same greedy request, not streamed), the tokenizer view /tokenize's ids, API errors
must show on the page, and with --api-key the page asks for the key. Screenshots are saved as test artifacts
(to $GPTCLI_TEST_ARTIFACTS when set)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest

from servers import Server, server_env, write_tiny_checkpoint

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
needs_browser = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); "
           ".ci/run installs them with apt-get")

KEY = "playground-key-42"
MODEL = "tiny"
PROMPT = "Every effort moves you"  # 4 tokens: with 10 more, within the tiny model's context of 16
SHARPEN = 12.0  # logits x12: greedy tokens get 10-60% (two colour bands), not all under 1% as at random
BANDS = ((0.5, "green"), (0.1, "yellow"), (0.01, "dark_orange"), (0.0, "red"))  # probability_view.BANDS
WAIT_S = 60


def band(prob: float) -> str:
    return next(name for lowest, name in BANDS if prob >= lowest)


def write_sharp_checkpoint(folder: Path) -> Path:
    """The tests' tiny checkpoint with its final layer norm scaled, which scales every logit: a model as
    sure of itself as a trained one, so the page shows more than one colour."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = write_tiny_checkpoint(folder)
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    tensors["final_norm.scale"] *= SHARPEN
    tensors["final_norm.shift"] *= SHARPEN
    save_file(tensors, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_sharp_checkpoint(tmp_path_factory.mktemp("playground") / MODEL).parent


@pytest.fixture(scope="module")
def env(tiktoken_cache, tmp_path_factory) -> dict[str, str]:
    return server_env(tiktoken_cache, tmp_path_factory.mktemp("gptcli-cache"))


@pytest.fixture(scope="module")
def server(checkpoint, env):
    srv = Server(["--weights", str(checkpoint)], env)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def keyed_server(checkpoint, env):
    srv = Server(["--weights", str(checkpoint), "--api-key", KEY], env)
    yield srv
    srv.stop()


@pytest.fixture
def artifacts(tmp_path) -> Path:
    folder = Path(os.environ.get("GPTCLI_TEST_ARTIFACTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def root_url(srv: Server) -> str:
    return f"http://127.0.0.1:{srv.port}/"


def completion(srv: Server, prompt: str, headers: dict | None = None, **fields) -> dict:
    status, body = srv.json("POST", "/v1/completions", {"model": MODEL, "prompt": prompt, **fields}, headers=headers)
    assert status == 200, body
    return body


# ---------------------------------------------------------------------------------------------
# The page as HTTP serves it (no browser)


def test_the_page_is_one_self_contained_file_from_the_package(server, keyed_server):
    from gptcli.serving.playground import playground_html

    status, headers, body = server.request("GET", "/")
    html = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert html == playground_html() == (Path(__file__).parent.parent / "gptcli/serving/static/playground.html").read_text()
    # Nothing fetched from elsewhere: no external URL, no script or style file, and a policy that forbids them.
    assert "http://" not in html and "https://" not in html
    assert "<script src" not in html and 'rel="stylesheet"' not in html
    assert "default-src 'none'" in headers["content-security-policy"]
    assert "connect-src 'self'" in headers["content-security-policy"]
    assert server.request("HEAD", "/")[0] == 200
    # With --api-key the page itself needs no key (it asks for one); the API still does.
    assert keyed_server.request("GET", "/")[0] == 200
    assert keyed_server.request("GET", "/v1/models")[0] == 401


# ---------------------------------------------------------------------------------------------
# The page in chromium


def start_chromium(user_data_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_AVOID_STATS"] = "true"  # selenium's usage statistics: off (and there is no network)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={user_data_dir}", "--window-size=1200,900", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(WAIT_S)
    driver.set_script_timeout(WAIT_S)
    return driver


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs /usr/bin/chromium and /usr/bin/chromedriver")
    driver = start_chromium(tmp_path_factory.mktemp("chromium-profile"))
    yield driver
    driver.quit()


def wait_for(driver, condition, message: str, timeout: float = WAIT_S):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d), message)


def by_id(driver, element_id: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, element_id)


def set_field(driver, element_id: str, value: str) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(value)


def open_page(driver, srv: Server, *, connected: bool = True) -> None:
    driver.get(root_url(srv))
    if connected:
        wait_for(driver, lambda d: by_id(d, "model").text.startswith(MODEL), "the page did not load the model's name")


def generate(driver, prompt: str, max_tokens: int = 10, temperature: str = "0") -> None:
    set_field(driver, "prompt", prompt)
    set_field(driver, "max_tokens", str(max_tokens))
    set_field(driver, "temperature", temperature)
    set_field(driver, "top_p", "1")
    driver.execute_script("delete document.getElementById('out').dataset.done")
    by_id(driver, "generate").click()


def tokens_on_page(driver) -> list[dict]:
    """Each coloured span of the output: its text, class, probability, log-probabilities, background."""
    return driver.execute_script("""
        return [...document.querySelectorAll('#out .tok')].map((s) => ({
            text: s.textContent, cls: s.className, band: s.dataset.band, prob: Number(s.dataset.prob),
            logprobs: JSON.parse(s.dataset.logprobs), background: getComputedStyle(s).backgroundColor}));""")


def swatch_colours(driver) -> dict[str, str]:
    return driver.execute_script("""
        const out = {};
        for (const s of document.querySelectorAll('#legend .sw'))
            out[s.className.replace('sw p-', '')] = getComputedStyle(s).backgroundColor;
        return out;""")


def page_errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def shoot(driver, artifacts: Path, name: str, *, tooltip: bool = False) -> Path:
    path = artifacts / name
    if not tooltip:
        driver.execute_script("document.getElementById('tip').hidden = true")
    assert driver.save_screenshot(str(path)), path
    assert path.stat().st_size > 10_000  # a real picture of the page, not an empty frame
    return path


@needs_browser
def test_generate_streams_tokens_coloured_by_the_apis_probabilities(browser, server, artifacts):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    generate(browser, PROMPT)
    # Tokens appear while it streams, then the stats line says it ended.
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#out .tok"), "no streamed token appeared")
    wait_for(browser, lambda d: by_id(d, "out").get_attribute("data-done") == "true", "the stream did not end")
    assert by_id(browser, "error").get_attribute("hidden") is not None, by_id(browser, "error").text

    api = completion(server, PROMPT, max_tokens=10, temperature=0, logprobs=5)["choices"][0]
    spans = tokens_on_page(browser)
    assert "".join(s["text"] for s in spans) == api["text"] and api["text"]
    assert by_id(browser, "out").text == PROMPT + api["text"]  # the prompt (dimmed), then the continuation
    shown = [lp for s in spans for lp in s["logprobs"]]
    assert shown == pytest.approx(api["logprobs"]["token_logprobs"], abs=1e-12)
    assert len(shown) == 10 and "10 tokens" in by_id(browser, "stats").text

    swatches = swatch_colours(browser)
    assert len(set(swatches.values())) == 4  # four colours the legend tells apart
    for s in spans:
        prob = math.exp(min(s["logprobs"]))  # a character split across tokens: the least likely of them
        assert s["prob"] == pytest.approx(prob, rel=1e-12)
        assert s["band"] == band(prob) and f"p-{band(prob)}" in s["cls"]
        assert s["background"] == swatches[s["band"]]  # coloured as the legend says
    assert len({s["band"] for s in spans}) >= 2, [s["prob"] for s in spans]

    # Hover: the step's top alternatives, likeliest first, the chosen one marked.
    first = browser.find_elements(By.CSS_SELECTOR, "#out .tok")[0]
    ActionChains(browser).move_to_element(first).perform()
    tip = by_id(browser, "tip")
    wait_for(browser, lambda d: tip.is_displayed(), "no tooltip on hover")
    rows = tip.find_elements(By.CSS_SELECTOR, "tr")
    top = api["logprobs"]["top_logprobs"][0]
    assert len(rows) == len(top) == 5
    probs = [math.exp(lp) for lp in sorted(top.values(), reverse=True)]
    cells = [r.find_element(By.CSS_SELECTOR, "td.p").text for r in rows]
    assert [c for c, p in zip(cells, probs) if p >= 0.001] == [f"{100 * p:.1f}%" for p in probs if p >= 0.001]
    assert probs[0] >= 0.001 and all(c.endswith("%") for c in cells)
    assert "chosen" in rows[0].get_attribute("class")  # greedy: the likeliest
    shoot(browser, artifacts, "playground-hover.png", tooltip=True)
    assert page_errors(browser) == []  # no script error, no request the page's policy refused
    # Everything the page loaded came from its own server (no CDN, fonts or images from elsewhere).
    loaded = browser.execute_script("return performance.getEntriesByType('resource').map((e) => e.name)")
    assert loaded and all(url.startswith(root_url(server)) for url in loaded), loaded

    for theme in ("light", "dark"):
        browser.execute_script(f"applyTheme('{theme}')")
        shoot(browser, artifacts, f"playground-{theme}.png")
    browser.execute_script("applyTheme('auto')")
    assert swatch_colours(browser) == swatches


@needs_browser
def test_sampled_streams_match_the_api_with_the_same_seed(browser, server):
    from selenium.webdriver.common.keys import Keys

    open_page(browser, server)
    set_field(browser, "seed", "7")
    set_field(browser, "prompt", "The sky")
    set_field(browser, "max_tokens", "12")
    set_field(browser, "temperature", "0.9")
    by_id(browser, "prompt").send_keys(Keys.CONTROL, Keys.ENTER)  # the keyboard's Generate
    wait_for(browser, lambda d: by_id(d, "out").get_attribute("data-done") == "true", "the stream did not end")
    set_field(browser, "seed", "")
    api = completion(server, "The sky", max_tokens=12, temperature=0.9, top_p=1, seed=7, logprobs=5)["choices"][0]
    spans = tokens_on_page(browser)
    assert "".join(s["text"] for s in spans) == api["text"]
    assert [lp for s in spans for lp in s["logprobs"]] == pytest.approx(api["logprobs"]["token_logprobs"], abs=1e-12)


@needs_browser
def test_stop_ends_the_stream_and_the_server_frees_the_row(browser, server):
    from selenium.webdriver.common.by import By

    open_page(browser, server)
    steps_before = server.json("GET", "/health")[1]["steps"]
    generate(browser, PROMPT, max_tokens=1024, temperature="1")  # the cap: seconds of tokens
    button = by_id(browser, "generate")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#out .tok")) >= 3, "no streamed token")
    assert button.text == "Stop"
    button.click()
    wait_for(browser, lambda d: by_id(d, "stats").text.startswith("stopped after"), "Stop did not stop the stream")
    assert button.text == "Generate" and not by_id(browser, "error").is_displayed()
    shown = len(browser.find_elements(By.CSS_SELECTOR, "#out .tok"))
    assert 3 <= shown < 1024

    def idle(_):
        status, body = server.json("GET", "/health")
        return status == 200 and body["running"] == 0 and body["waiting"] == 0

    wait_for(browser, idle, "the server still decodes the stopped request", timeout=30)
    steps = server.json("GET", "/health")[1]["steps"] - steps_before
    assert steps < 1000, f"{steps} decode steps: the row ran on after the page stopped reading"


@needs_browser
def test_the_tokenizer_view_shows_the_prompts_tokens(browser, server):
    from selenium.webdriver.common.by import By

    from gptcli.tokenizer import encode

    open_page(browser, server)
    prompt = "Hello, world! naïve 🦙 日本語\n\tend"
    # Pasted, as it were: chromedriver types no characters beyond the BMP, and Tab moves the focus.
    browser.execute_script("const p = document.getElementById('prompt'); p.value = arguments[0];"
                           "p.dispatchEvent(new Event('input'))", prompt)
    status, body = server.json("POST", "/tokenize", {"prompt": prompt})
    assert status == 200
    ids = body["tokens"]

    def chips(d):
        return d.execute_script("return [...document.querySelectorAll('#tokens .chip')].map("
                                "(c) => [c.dataset.ids.split(' ').map(Number), c.dataset.text, c.className])")

    wait_for(browser, lambda d: [i for c in chips(d) for i in c[0]] == ids, "the tokenizer view shows other ids")
    shown = chips(browser)
    assert "".join(text for _, text, _ in shown) == prompt
    assert f"{len(ids)} tokens of a 16-token context" in by_id(browser, "tokcount").text
    # The emoji is split across byte tokens: one chip holds them all, showing the character.
    emoji = [c for c in shown if "🦙" in c[1]]
    assert emoji == [[encode(" 🦙"), " 🦙", "chip split"]] and len(emoji[0][0]) == 3
    assert [c[1] for c in shown if "split" in c[2]] == [" 🦙", " 日", "本", "語"]
    # Spaces, the newline and the tab are made visible, and each chip shows its id.
    texts = [c.text for c in browser.find_elements(By.CSS_SELECTOR, "#tokens .chip")]
    assert "·world\n995" in texts and any("↵" in t for t in texts) and any("→" in t for t in texts)


@needs_browser
def test_api_errors_are_shown_on_the_page(browser, server):
    open_page(browser, server)
    long_prompt = " ".join(["word"] * 20)  # more than the context of 16
    generate(browser, long_prompt, max_tokens=4)
    error = by_id(browser, "error")
    wait_for(browser, lambda d: error.is_displayed(), "the API's 400 was not shown")
    status, body = server.json("POST", "/v1/completions", {"model": MODEL, "prompt": long_prompt, "max_tokens": 4})
    assert status == 400
    assert error.text == f"Error 400 (context_length_exceeded): {body['error']['message']}"
    assert "maximum context length is 16 tokens" in error.text
    wait_for(browser, lambda d: "too long for the model" in by_id(d, "tokcount").text, "no warning on the count")

    generate(browser, PROMPT, max_tokens=5000)  # over --max-tokens-cap
    wait_for(browser, lambda d: "max_tokens" in error.text, "the refused max_tokens was not shown")
    assert error.text.startswith("Error 400")

    set_field(browser, "max_tokens", "")
    by_id(browser, "generate").click()
    wait_for(browser, lambda d: "max tokens must be a whole number" in error.text, "a blank field went unreported")

    generate(browser, PROMPT, max_tokens=3)  # a good request clears the error
    wait_for(browser, lambda d: by_id(d, "out").get_attribute("data-done") == "true", "the stream did not end")
    assert not error.is_displayed()

    result = by_id(browser, "out").text  # a refused request leaves the last result in place
    assert result.startswith(PROMPT) and len(result) > len(PROMPT)
    generate(browser, long_prompt, max_tokens=4)
    wait_for(browser, lambda d: error.is_displayed(), "the second 400 was not shown")
    assert by_id(browser, "out").text == result


@pytest.fixture(scope="module")
def char_server(env, tmp_path_factory):
    from servers import write_char_checkpoint

    chars = "".join(sorted(set("abcdefghijklmnopqrstuvwxyz ,.\n")))
    srv = Server(["--weights", str(write_char_checkpoint(tmp_path_factory.mktemp("chars") / "chars", chars).parent)],
                 env)
    yield srv
    srv.stop()


@needs_browser
def test_a_character_model_names_the_characters_it_lacks(browser, char_server, artifacts):
    browser.get(root_url(char_server))
    wait_for(browser, lambda d: by_id(d, "model").text.startswith("chars"), "the page did not load the model's name")
    generate(browser, "hello ZZZ@#", max_tokens=4)
    error = by_id(browser, "error")
    wait_for(browser, lambda d: error.is_displayed() and "Error 400" in error.text, "the 400 was not shown")
    assert "characters '#', '@', 'Z' are not in this model's vocabulary of 30 characters" in error.text
    shoot(browser, artifacts, "playground-char-error.png")
    generate(browser, "hello", max_tokens=4)
    wait_for(browser, lambda d: by_id(d, "out").get_attribute("data-done") == "true", "the stream did not end")
    assert not error.is_displayed() and by_id(browser, "out").text.startswith("hello")


@needs_browser
def test_with_an_api_key_the_page_asks_for_it_and_works_once_given(keyed_server, tmp_path, artifacts):
    driver = start_chromium(tmp_path / "chromium-profile")
    try:
        open_page(driver, keyed_server, connected=False)
        keybox, error = by_id(driver, "keybox"), by_id(driver, "error")
        wait_for(driver, lambda d: keybox.is_displayed() and error.is_displayed(), "the page did not ask for a key")
        assert "needs an API key (401)" in error.text and "send 'Authorization: Bearer KEY'" in error.text
        assert by_id(driver, "key").get_attribute("type") == "password"
        shoot(driver, artifacts, "playground-needs-key.png")

        set_field(driver, "key", "clé")  # no HTTP header carries it: said on the page, not sent
        by_id(driver, "usekey").click()
        wait_for(driver, lambda d: "only printable ASCII" in error.text, "an unsendable key was not reported")

        set_field(driver, "key", "not-the-key")
        by_id(driver, "usekey").click()
        wait_for(driver, lambda d: "Incorrect API key provided." in error.text, "a wrong key was not reported")
        assert "refused" in by_id(driver, "keyhint").text

        set_field(driver, "key", KEY)
        by_id(driver, "usekey").click()
        wait_for(driver, lambda d: by_id(d, "model").text.startswith(MODEL), "the right key did not connect")
        assert not error.is_displayed() and "accepted" in by_id(driver, "keyhint").text
        assert driver.execute_script("return sessionStorage.getItem('gptcli-playground-key')") == KEY

        generate(driver, PROMPT, max_tokens=6)
        wait_for(driver, lambda d: by_id(d, "out").get_attribute("data-done") == "true", "the stream did not end")
        api = completion(keyed_server, PROMPT, headers={"Authorization": f"Bearer {KEY}"}, max_tokens=6,
                         temperature=0)["choices"][0]
        assert "".join(s["text"] for s in tokens_on_page(driver)) == api["text"]
        wait_for(driver, lambda d: d.find_elements("css selector", "#tokens .chip"), "no tokens with the key")
        shoot(driver, artifacts, "playground-api-key.png")

        open_page(driver, keyed_server)  # a reload in the same tab keeps the key (sessionStorage)
        wait_for(driver, lambda d: d.find_elements("css selector", "#tokens .chip"), "no tokens after a reload")
        assert not by_id(driver, "error").is_displayed() and by_id(driver, "keybox").is_displayed()
    finally:
        driver.quit()


# ---------------------------------------------------------------------------------------------
# The chat view, for a model whose checkpoint names a template


CHAT_MODEL = "instruct"


@pytest.fixture(scope="module")
def chat_server(env, tmp_path_factory):
    from servers import write_chat_checkpoint

    srv = Server(["--weights", str(write_chat_checkpoint(tmp_path_factory.mktemp("chat") / CHAT_MODEL).parent)], env)
    yield srv
    srv.stop()


def chat_api(srv: Server, messages: list[dict], **fields) -> dict:
    status, body = srv.json("POST", "/v1/chat/completions", {"model": CHAT_MODEL, "messages": messages, **fields})
    assert status == 200, body
    return body["choices"][0]


def messages_on_page(driver) -> list[tuple[str, str]]:
    return [tuple(m) for m in driver.execute_script("return [...document.querySelectorAll('#messages .msg')].map("
                                 "(m) => [m.className.replace('msg ', ''), m.querySelector('.body').textContent])")]


def send_chat(driver, text: str) -> None:
    driver.execute_script("delete document.getElementById('messages').dataset.done")
    set_field(driver, "chat-input", text)
    by_id(driver, "send").click()
    wait_for(driver, lambda d: by_id(d, "messages").get_attribute("data-done") == "true", "the answer did not end")


@needs_browser
def test_the_chat_view_is_there_only_for_a_model_with_a_template(browser, server, chat_server, artifacts):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    page_errors(browser)  # reading the log empties it: what earlier tests left is not this test's
    open_page(browser, server)  # no template: completions only, no chat controls
    assert not by_id(browser, "modes").is_displayed() and not by_id(browser, "chatbox").is_displayed()
    assert by_id(browser, "promptbox").is_displayed()

    browser.get(root_url(chat_server))
    wait_for(browser, lambda d: by_id(d, "model").text.startswith(CHAT_MODEL), "the page did not load the model")
    wait_for(browser, lambda d: by_id(d, "chatbox").is_displayed(), "a model with a template opens in the chat view")
    assert by_id(browser, "modes").is_displayed() and not by_id(browser, "promptbox").is_displayed()
    assert "alpaca" in by_id(browser, "chatinfo").text
    set_field(browser, "max_tokens", "10")
    set_field(browser, "temperature", "0.9")  # sampled, seeded: the tiny random model loops when greedy
    set_field(browser, "seed", "3")
    set_field(browser, "system", "You answer in one word.")
    first = "Name three colours."
    send_chat(browser, first)
    system = {"role": "system", "content": "You answer in one word."}
    api = chat_api(chat_server, [system, {"role": "user", "content": first}], max_tokens=10, temperature=0.9,
                   seed=3, top_p=1, logprobs=True, top_logprobs=5)
    answer = api["message"]["content"]
    assert answer and messages_on_page(browser) == [("user", first), ("assistant", answer)]
    spans = browser.execute_script("return [...document.querySelectorAll('#messages .tok')].map("
                                   "(s) => JSON.parse(s.dataset.logprobs))")
    assert [lp for s in spans for lp in s] == pytest.approx([t["logprob"] for t in api["logprobs"]["content"]],
                                                            abs=1e-12)
    assert "10 tokens" in by_id(browser, "chat-stats").text

    # A second turn sends the whole conversation: the API's answer to the same messages.
    second = "And a fourth?"
    send_chat(browser, second)
    again = chat_api(chat_server, [system, {"role": "user", "content": first}, {"role": "assistant", "content": answer},
                                   {"role": "user", "content": second}], max_tokens=10, temperature=0.9, seed=3,
                   top_p=1)
    assert messages_on_page(browser) == [("user", first), ("assistant", answer), ("user", second),
                                         ("assistant", again["message"]["content"])]
    assert not by_id(browser, "error").is_displayed()
    ActionChains(browser).move_to_element(browser.find_elements(By.CSS_SELECTOR, "#messages .tok")[0]).perform()
    wait_for(browser, lambda d: by_id(d, "tip").is_displayed(), "no tooltip on a chat token")
    assert len(by_id(browser, "tip").find_elements(By.CSS_SELECTOR, "tr")) == 5
    shoot(browser, artifacts, "playground-chat.png")
    assert page_errors(browser) == []

    # A bad message is the API's 400 on the page, and the message goes back to the input.
    set_field(browser, "max_tokens", "100000")
    set_field(browser, "chat-input", "hello")
    by_id(browser, "send").click()
    wait_for(browser, lambda d: by_id(d, "error").is_displayed(), "the 400 was not shown")
    assert "Error 400" in by_id(browser, "error").text and "max_tokens" in by_id(browser, "error").text
    assert by_id(browser, "chat-input").get_attribute("value") == "hello" and len(messages_on_page(browser)) == 4

    by_id(browser, "mode-complete").click()  # the completions view is one click away
    assert by_id(browser, "promptbox").is_displayed() and not by_id(browser, "chatbox").is_displayed()
    by_id(browser, "mode-chat").click()
    assert len(messages_on_page(browser)) == 4  # the conversation is still there
    by_id(browser, "newchat").click()
    assert messages_on_page(browser) == []
    assert [e for e in page_errors(browser) if "status of 400" not in e] == []  # the refused request, logged
