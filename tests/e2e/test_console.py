"""The operator console in a real browser (headless Chromium through Selenium) against the whole mesh
`autoglm up` starts: sign in with the admin token; create a key on Keys and use it with the official
openai client; see its spend on Spend within a refresh; watch a low budget's level move to WARNING then
CRITICAL on Budgets, each with the time it fired; see a replica's health, queue, KV use and tokens/s on
Models while it generates; change a traffic split on Models and find it in `autoglm audit`; revoke the key and
see the next call refused; find the split (the router's) above the budget's change (billing's) on the merged
Audit page and in `autoglm audit --source all`, and page the timeline in small pages with one token. Changes without the admin session (or its CSRF token) are refused, forms show
the CLI's message for bad input, and no page shows a secret but the new key's, once. Each page's
screenshot goes to tests/e2e/screenshots/ (ignored by git)."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import ssl
import subprocess
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import httpx
import openai
import pytest
from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from autoglm.router.v1 import admin_service_pb2, admin_service_pb2_grpc
from services.cli.endpoint import billing_token
from tests.conftest import ROOT, require_real_component, tool
from tests.e2e.mesh_client import MODEL, router_channel, usage_totals
from tests.e2e.mesh_process import Mesh, start_mesh, stop_mesh
from tests.settlement import settled_usage
from tests.waiting import wait_until_blocking

SCREENSHOTS = ROOT / "tests" / "e2e" / "screenshots"
READ_TOKEN = "read-only-operator-token-for-the-console"
TENANT = "console-e2e"
T = TypeVar("T")
PAGES = ("spend", "budgets", "keys", "models", "audit", "live")


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    started: list[subprocess.Popen[bytes]] = []
    running = start_mesh(tmp_path_factory.mktemp("mesh"), started,
                         extra_config={"router": {"operator_read_token": READ_TOKEN}})
    try:
        yield running
    finally:
        if running.process.poll() is None:
            assert stop_mesh(running) == 0
        assert running.descendants() == []


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    require_real_component(bool(chromium and driver), "chromium and chromedriver",
                           "apt-get install chromium chromium-driver, or `make chromium` (mk/console.mk)")
    options = webdriver.ChromeOptions()
    options.binary_location = str(chromium)
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1440,1000",
                 "--ignore-certificate-errors", "--disable-gpu"):
        options.add_argument(flag)
    session = webdriver.Chrome(service=Service(str(driver)), options=options)
    try:
        yield session
    finally:
        session.quit()


def base(mesh: Mesh) -> str:
    return mesh.openai_base_url.removesuffix("/v1")


def admin_token(mesh: Mesh) -> str:
    return (mesh.data_dir / "router" / "admin_token").read_text().strip()


def secrets_of(mesh: Mesh) -> list[str]:
    return [admin_token(mesh), billing_token(mesh.data_dir), READ_TOKEN]


def http(mesh: Mesh) -> httpx.Client:
    return httpx.Client(base_url=base(mesh), verify=ssl.create_default_context(cafile=mesh.ca_cert), timeout=30)


def signed_in(client: httpx.Client, token: str) -> str:
    """Sign `client` in; the CSRF token of its session (from a page's meta tag)."""
    assert client.post("/console/api/session", json={"token": token}).status_code == 200
    match = re.search(r'name="csrf-token" content="([^"]+)"', client.get("/console/keys").text)
    assert match
    return match[1]


def sdk(mesh: Mesh, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=mesh.openai_base_url, api_key=key, max_retries=0,
                         http_client=httpx.Client(verify=ssl.create_default_context(cafile=mesh.ca_cert), timeout=120))


def ask(mesh: Mesh, key: str) -> None:
    sdk(mesh, key).chat.completions.create(model=MODEL, max_tokens=24, temperature=0,
                                           messages=[{"role": "user", "content": "Name three colours."}])


def shot(browser: WebDriver, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / f"{name}.png"))


def visit(browser: WebDriver, mesh: Mesh, path: str) -> None:
    browser.get(base(mesh) + path)


def message(browser: WebDriver, containing: str) -> str:
    return wait_until_blocking(lambda: containing in (text := browser.find_element(By.ID, "message").text) and text,
                               10, f"the page's message to say {containing!r}")


def unless_stale(read: Callable[[], T]) -> T | None:
    """`read()`, or None while the page it reads is being replaced (a reload after a change): the element
    read went stale, or the new document has not rendered it yet. Chromium reports an element replaced in
    the middle of a read as an inspector error, not as a stale element: that counts as stale too."""
    try:
        return read()
    except (StaleElementReferenceException, NoSuchElementException):
        return None
    except WebDriverException as error:
        if "does not belong to the document" in (error.msg or ""):
            return None
        raise


def fill(browser: WebDriver, fields: dict[str, str]) -> None:
    for element_id, value in fields.items():
        element = browser.find_element(By.ID, element_id)
        element.clear()
        element.send_keys(value)


def budget_row(browser: WebDriver, mesh: Mesh, budget_id: str) -> dict[str, str]:
    visit(browser, mesh, "/console/budgets")
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-budget="{budget_id}"]')
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    fired = [f.text.split(" at ")[0].split(" ", 1) for f in row.find_elements(By.CSS_SELECTOR, "td.fired .firing")]
    return {"spent": cells[3], "limit": cells[5].split()[0], "level": cells[7], "fired": fired}


def test_the_banner_names_the_console(mesh: Mesh) -> None:
    assert f"console    {base(mesh)}/console/" in "".join(mesh.output)


def test_changes_without_the_admin_session_are_refused(mesh: Mesh) -> None:
    with http(mesh) as anonymous:
        assert anonymous.get("/console/keys", follow_redirects=False).headers["location"] == "/console/login"
        refused = anonymous.post("/console/api/keys", json={"tenant": TENANT})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        assert anonymous.post("/console/api/session", json={"token": "not-a-token"}).status_code == 401
    with http(mesh) as reader:
        csrf = signed_in(reader, READ_TOKEN)
        assert reader.get("/console/budgets").status_code == 200, "the read-only token may look"
        for path, body in (("/console/api/keys", {"tenant": TENANT}), ("/console/api/budgets", {"tenant": TENANT}),
                           (f"/console/api/models/{MODEL}/split", {"weights": {"x": 1000}})):
            answer = reader.post(path, json=body, headers={"x-csrf-token": csrf})
            assert answer.status_code == 403, path
            assert "operator-read token may view" in answer.json()["error"]["message"]
    with http(mesh) as admin:
        csrf = signed_in(admin, admin_token(mesh))
        assert admin.post("/console/api/keys", json={"tenant": TENANT}).status_code == 403, "no CSRF token"
        assert admin.post("/console/api/keys", json={"tenant": TENANT},
                          headers={"x-csrf-token": csrf, "origin": "https://elsewhere.example"}).status_code == 403
        forged = admin.cookies["autoglm_console"].replace('"', "")
        admin.cookies.clear()
        admin.cookies.set("autoglm_console", forged[:-2] + ("AA" if forged[-2:] != "AA" else "BB"),
                          path="/console")
        assert admin.post("/console/api/keys", json={"tenant": TENANT},
                          headers={"x-csrf-token": csrf}).status_code == 401, "a forged cookie is no session"
        keys = admin_keys(mesh)
        assert not any(k.tenant_id == TENANT for k in keys), "nothing refused was created"


def admin_keys(mesh: Mesh) -> list[admin_service_pb2.ApiKey]:
    async def listing() -> list[admin_service_pb2.ApiKey]:
        async with router_channel(mesh) as channel:
            reply = await admin_service_pb2_grpc.AdminServiceStub(channel).ListApiKeys(
                admin_service_pb2.ListApiKeysRequest(include_revoked=True),
                metadata=(("authorization", f"Bearer {admin_token(mesh)}"),), timeout=10)
        return list(reply.api_keys)

    return asyncio.run(listing())


async def register_second_version(mesh: Mesh) -> None:
    metadata = (("authorization", f"Bearer {admin_token(mesh)}"),)
    async with router_channel(mesh) as channel:
        admin = admin_service_pb2_grpc.AdminServiceStub(channel)
        bundled = (await admin.GetModel(admin_service_pb2.GetModelRequest(model=MODEL), metadata=metadata,
                                        timeout=10)).model
        await admin.RegisterModelVersion(admin_service_pb2.RegisterModelVersionRequest(
            model=MODEL, version="console-canary", replicas=bundled.versions[0].replicas), metadata=metadata,
            timeout=30)


def test_an_operator_runs_the_mesh_from_the_console(mesh: Mesh, browser: WebDriver) -> None:
    # Sign in.
    visit(browser, mesh, "/console/spend")
    assert browser.current_url.endswith("/console/login")
    shot(browser, "login")
    fill(browser, {"token": "wrong token"})
    browser.find_element(By.ID, "sign-in").click()
    message(browser, "neither the admin token nor the operator-read token")
    fill(browser, {"token": admin_token(mesh)})
    browser.find_element(By.ID, "sign-in").click()
    wait_until_blocking(lambda: browser.current_url.endswith("/console/spend"), 10, "the Spend page after sign-in")
    cookie = browser.get_cookie("autoglm_console")
    assert cookie and cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"

    # Create a key; bad input first gets the CLI's message.
    visit(browser, mesh, "/console/keys")
    fill(browser, {"key-tenant": TENANT, "key-name": "console", "key-rpm": "lots"})
    browser.find_element(By.ID, "key-create").click()
    message(browser, "argument --rpm: invalid int value: 'lots'")
    fill(browser, {"key-rpm": "600"})
    browser.find_element(By.ID, "key-create").click()
    message(browser, f"created for tenant {TENANT}")
    secret = browser.find_element(By.ID, "secret-value").text
    key_id = browser.find_element(By.ID, "new-secret").get_attribute("data-key")
    assert secret and key_id
    shot(browser, "keys-new-secret")

    # Use it through the OpenAI API; its spend shows on Spend without reloading the page.
    ask(mesh, secret)
    visit(browser, mesh, "/console/spend?by=tenant&since=24h&granularity=hour")
    wait_until_blocking(lambda: browser.find_elements(By.CSS_SELECTOR, f'#spend-rows tr[data-group="{TENANT}"]'),
                        30, f"a Spend row for {TENANT}")
    wait_until_blocking(lambda: browser.find_elements(By.CSS_SELECTOR, f'#top-keys tr[data-key="{key_id}"]'),
                        30, f"{key_id} among the top keys")
    shot(browser, "spend")

    # A budget: bad input gets the CLI's message; then low enough for WARNING, lower for CRITICAL.
    visit(browser, mesh, "/console/budgets")
    fill(browser, {"budget-tenant": TENANT, "budget-amount": "abc"})
    browser.find_element(By.ID, "budget-soft").click()
    browser.find_element(By.ID, "budget-save").click()
    message(browser, "argument --amount: 'abc' is not an amount like 2.5")
    fill(browser, {"budget-amount": "", "budget-tokens": "1000000"})
    browser.find_element(By.ID, "budget-save").click()
    saved = message(browser, "saved")
    budget_id = saved.split()[1]
    for _ in range(3):  # spend the budget counts (from its creation on)
        ask(mesh, secret)
    asyncio.run(settled_usage(lambda: usage_totals(mesh, TENANT), lambda t: t.requests, 4,
                              f"4 usage events for {TENANT}", routers=[mesh.data_dir / "router"]))
    spent = int(budget_row(browser, mesh, budget_id)["spent"])
    assert spent >= 50, f"enough tokens spent to place the limits ({spent})"

    def edit_budget(tokens: int) -> None:
        visit(browser, mesh, "/console/budgets")
        browser.find_element(By.CSS_SELECTOR, f'.edit-budget[data-id="{budget_id}"]').click()
        fill(browser, {"budget-tokens": str(tokens)})
        browser.find_element(By.ID, "budget-save").click()
        message(browser, "saved")

    def spend_once(requests: int) -> dict[str, str]:
        ask(mesh, secret)  # a level fires when billing counts the usage that crosses it
        asyncio.run(settled_usage(lambda: usage_totals(mesh, TENANT), lambda t: t.requests, requests,
                                  f"{requests} usage events for {TENANT}", routers=[mesh.data_dir / "router"]))
        return budget_row(browser, mesh, budget_id)

    # ~85 % after one more request like the last three (WARNING); then 90 % (lowering the limit, so nothing
    # re-arms) and ~112 % after another request (CRITICAL).
    warning_limit = (spent + spent // 3) * 100 // 85
    edit_budget(warning_limit)
    warned = spend_once(5)
    assert warned["level"] == "WARNING" and [level for level, _ in warned["fired"]] == ["WARNING"]
    shot(browser, "budgets")
    edit_budget(min(warning_limit, -(-int(warned["spent"]) * 10 // 9)))
    assert budget_row(browser, mesh, budget_id)["level"] == "WARNING"
    critical = spend_once(6)
    assert critical["level"] == "CRITICAL"
    assert [level for level, _ in critical["fired"]] == ["WARNING", "CRITICAL"]
    assert critical["fired"][0] == warned["fired"][0], "the time WARNING fired stays as it was"
    assert warned["fired"][0][1] <= critical["fired"][1][1]

    # Models: a bad split gets the registry's message; a good one shows in `autoglm audit`.
    asyncio.run(register_second_version(mesh))
    visit(browser, mesh, "/console/models")
    form = browser.find_element(By.CSS_SELECTOR, f'.split-form[data-model="{MODEL}"]')
    inputs = {i.get_attribute("name"): i for i in form.find_elements(By.CLASS_NAME, "split-weight")}
    stable = next(name for name in inputs if name != "console-canary")
    inputs[stable].clear()
    inputs[stable].send_keys("900")
    inputs["console-canary"].clear()
    inputs["console-canary"].send_keys("50")
    form.find_element(By.CLASS_NAME, "split-save").click()
    message(browser, "weights must sum to 1000 per-mille, got 950")
    inputs["console-canary"].clear()
    inputs["console-canary"].send_keys("100")
    form.find_element(By.CLASS_NAME, "split-save").click()
    message(browser, "traffic split saved")
    audit = subprocess.run([tool("autoglm"), "audit", "--data-dir", str(mesh.data_dir), "--action", "model.split",
                            "--format", "json"], capture_output=True, text=True, timeout=60, check=True)
    newest = json.loads(audit.stdout)[0]
    assert newest["actor"] == "console" and newest["target"] == f"model/{MODEL}"
    assert newest["details"]["weights"] == {stable: 900, "console-canary": 100}
    both = subprocess.run([tool("autoglm"), "audit", "--data-dir", str(mesh.data_dir), "--source", "all",
                           "--format", "json"], capture_output=True, text=True, timeout=60, check=True)
    merged = [(e["source"], e["action"], e["target"]) for e in json.loads(both.stdout)]
    assert merged.index(("router", "model.split", f"model/{MODEL}")) < merged.index(
        ("billing", "budget.update", f"budget/{budget_id}")), "`autoglm audit --source all`: both logs, newest first"
    visit(browser, mesh, "/console/models")
    wait_until_blocking(lambda: browser.find_elements(By.CSS_SELECTOR, ".split-form"), 10, "the Models page")
    shot(browser, "models")

    # Revoke the key (its last use shows beside it); the next call is refused.
    def last_use() -> str:
        visit(browser, mesh, "/console/keys")
        cell = browser.find_element(By.CSS_SELECTOR, f'td.last-use[data-key="{key_id}"]')
        return wait_until_blocking(lambda: cell.text != "…" and cell.text, 10, "the last-use column filled in")

    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:00:00", last_use()), "the hour of the key's last use"
    browser.find_element(By.CSS_SELECTOR, f'.revoke[data-id="{key_id}"]').click()
    wait_until_blocking(lambda: unless_stale(lambda: "revoked" in (browser.find_element(
        By.CSS_SELECTOR, f'tr[data-key="{key_id}"]').get_attribute("class") or "")), 10, "the key shown revoked")
    with pytest.raises(openai.AuthenticationError):
        ask(mesh, secret)

    # Audit: both services' events on one timeline, newest first: the split (recorded by the router) above
    # the budget's last change (recorded by billing), which came before it. Then each log alone; Live; no
    # page shows a secret (the new key's only right after it was made).
    visit(browser, mesh, "/console/audit")
    rows = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")]  # time, source, actor, action, target
            for row in browser.find_elements(By.CSS_SELECTOR, "#audit tbody tr[data-source]")]
    split_at = next((i for i, r in enumerate(rows) if r[1:4] == ["router", "console", "model.split"]), None)
    budget_at = next((i for i, r in enumerate(rows) if r[1] == "billing" and r[3] == "budget.update"
                      and r[4] == f"budget/{budget_id}"), None)
    assert split_at is not None and budget_at is not None, f"both logs on the default Audit page: {rows}"
    assert split_at < budget_at, "newest first across both logs"
    assert [r[0] for r in rows] == sorted((r[0] for r in rows), reverse=True)
    shot(browser, "audit")
    visit(browser, mesh, "/console/audit?source=router&action=key.revoke")
    assert key_id in browser.find_element(By.ID, "audit").text
    visit(browser, mesh, "/console/audit?source=billing&action=budget.update")
    assert budget_id in browser.find_element(By.ID, "audit").text
    visit(browser, mesh, "/console/live")
    wait_until_blocking(lambda: browser.find_element(By.ID, "now-rps").text not in ("", "–"), 30,
                        "the Live page's first figures")
    shot(browser, "live")
    for name in PAGES:
        visit(browser, mesh, f"/console/{name}")
        source = browser.page_source
        for hidden in [*secrets_of(mesh), secret]:
            assert hidden not in source, f"a secret on the {name} page"
    shot(browser, "keys")


def test_spend_downloads_as_csv_and_a_pages_error_is_a_page(mesh: Mesh) -> None:
    with http(mesh) as admin:
        signed_in(admin, admin_token(mesh))
        answer = admin.get("/console/api/spend.csv", params={"by": "model", "since": "24h", "granularity": "day"})
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/csv")
        assert answer.text.splitlines()[0] == "bucket,model,requests,prompt_tokens,completion_tokens,cost,anomalous"
        bad = admin.get("/console/api/spend", params={"by": "colour"})
        assert bad.status_code == 400 and "by must be one of" in bad.json()["error"]["message"]
        page = admin.get("/console/audit", params={"page_token": "not-a-token"})
        assert page.status_code == 400 and page.headers["content-type"].startswith("text/html")
        assert "page_token is not one this console handed out" in page.text, "a page's error is a page"


def test_the_audit_timeline_pages_both_logs_with_one_token(mesh: Mesh) -> None:
    """Small pages of /console/api/audit, followed by their tokens, are the whole merged timeline: each
    event once, newest first, both logs; the page's "Older events" link carries the same token; a token
    tampered with is a 400 that says so."""
    with http(mesh) as admin:
        change = {"x-csrf-token": signed_in(admin, admin_token(mesh))}
        made = set()
        for n in range(7):  # events in both logs, interleaved
            key = admin.post("/console/api/keys", json={"tenant": f"console-audit-{n}"}, headers=change)
            assert key.status_code == 200, key.text
            made.add(("router", f"key/{key.json()['key_id']}"))
            budget = admin.post("/console/api/budgets", json={"tenant": f"console-audit-{n}", "tokens": "1000000",
                                                              "soft": True}, headers=change)
            assert budget.status_code == 200, budget.text
            made.add(("billing", f"budget/{budget.json()['budget_id']}"))
        walks = {}
        for size in (2, 3):
            walked: list[dict[str, Any]] = []
            token = ""
            while True:
                answer = admin.get("/console/api/audit", params={"page_size": size, "page_token": token})
                assert answer.status_code == 200, answer.text
                walked += answer.json()["events"]
                token = answer.json()["next_page_token"]
                if not token:
                    break
                assert len(answer.json()["events"]) == size and len(walked) < 2000
            walks[size] = walked
        whole = admin.get("/console/api/audit", params={"page_size": 200}).json()
        assert whole["next_page_token"] == "", "every event of this mesh fits one page of 200"
        for size, walked in walks.items():
            ids = [(e["source"], e["sequence"]) for e in walked]
            assert len(set(ids)) == len(ids), f"an event repeated in pages of {size}"
            assert walked == whole["events"][len(whole["events"]) - len(walked):], f"pages of {size}"
            assert made <= {(e["source"], e["target"]) for e in walked}
            assert [e["time_us"] for e in walked] == sorted((e["time_us"] for e in walked), reverse=True)
        older = re.search(r'id="audit-next" href="([^"]+)"', admin.get("/console/audit").text)
        assert bool(older) == (len(whole["events"]) > 25), "the page shows 25, then links to older events"
        if older:
            next_page = admin.get(older[1].replace("&amp;", "&"))
            assert next_page.status_code == 200 and whole["events"][25]["target"] in next_page.text
        tampered = admin.get("/console/api/audit", params={"page_token": "eyJyb3V0ZXIiOiIxIn0"})
        assert tampered.status_code == 400
        assert "page_token is not one this console handed out" in tampered.json()["error"]["message"]
        assert admin.get("/console/api/audit", params={"source": "ledger"}).status_code == 400



def test_models_show_each_replicas_health_and_load_while_it_generates(mesh: Mesh, browser: WebDriver) -> None:
    with http(mesh) as admin:
        csrf = signed_in(admin, admin_token(mesh))
        made = admin.post("/console/api/keys", json={"tenant": f"{TENANT}-load"}, headers={"x-csrf-token": csrf})
        assert made.status_code == 200, made.text
        stream = sdk(mesh, made.json()["secret"]).chat.completions.create(
            model=MODEL, max_tokens=400, temperature=0, stream=True,
            messages=[{"role": "user", "content": "Tell a long story about the sea."}])
        try:
            next(iter(stream))  # the sequence runs on a replica now

            def busy_replica() -> dict[str, object] | None:
                models = admin.get("/console/api/models").json()["models"]
                replicas = [r for m in models if m["name"] == MODEL for v in m["versions"] for r in v["replicas"]]
                assert replicas and all(r["healthy"] and r["load"]["reported"] for r in replicas)
                for r in replicas:
                    load = r["load"]
                    assert load["kv_budget_bytes"] > 0 and load["queue_capacity"] > 0 and load["ready"]
                    if load["active_sequences"] >= 1 and load["kv_cache_bytes"] > 0 and load["tokens_per_second"] > 0:
                        return r
                return None

            busy = wait_until_blocking(busy_replica, 60, "a replica reporting its running sequence's KV and tokens/s")
            signed_in_browser(browser, mesh)
            visit(browser, mesh, "/console/models")
            shown = browser.find_element(By.CSS_SELECTOR, f'.replica[data-address="{busy["address"]}"]').text
            assert "healthy" in shown and "queue" in shown and "MiB" in shown and "tokens/s" in shown
        finally:
            stream.close()


def signed_in_browser(browser: WebDriver, mesh: Mesh) -> None:
    visit(browser, mesh, "/console/models")
    if browser.current_url.endswith("/console/login"):
        fill(browser, {"token": admin_token(mesh)})
        browser.find_element(By.ID, "sign-in").click()
        wait_until_blocking(lambda: not browser.current_url.endswith("/console/login"), 10, "signed in")
