#!/usr/bin/env python3
"""The admin page in a real browser: headless Chromium driven by Playwright.

Logs in, opens the key page, imports two keys by pasting text, sees them listed masked,
disables one, puts the other in a project with the project dialog, opens the settings page,
changes a value and sees it applied; on the plugins page, opens a plugin in the editor, checks
a broken edit (its line marked beside the code), saves a good one, and dry-runs a request.
Screenshots of
every step go to $GEMGATE_SHOTS. Run by tests/gateway/browser.rs against a fresh gemgate:

    GEMGATE_URL=http://127.0.0.1:8000 GEMGATE_ADMIN_TOKEN=... GEMGATE_SHOTS=target/browser-shots \
        python tests/browser/admin.py

Every wait is bounded, and the browser may only talk to 127.0.0.1.
"""
import os
import re
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from playwright.sync_api import expect, sync_playwright

BASE = os.environ["GEMGATE_URL"].rstrip("/")
TOKEN = os.environ["GEMGATE_ADMIN_TOKEN"]
SHOTS = Path(os.environ.get("GEMGATE_SHOTS", "target/browser-shots"))
CHROMIUM = os.environ.get("GEMGATE_CHROMIUM", "/usr/bin/chromium")
STEP_MS = 15_000
KEYS = ["AIzaSy" + "B" * 32 + "1", "AIzaSy" + "C" * 32 + "2"]

ARGS = [
    "--no-sandbox",
    "--disable-dev-shm-usage",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
]


def step(name, fn):
    started = time.monotonic()
    fn()
    print(f"ok   {name} ({time.monotonic() - started:.2f}s)")


def main():
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    signal.signal(signal.SIGALRM, lambda *_: sys.exit("the browser test took over 120 s"))
    signal.alarm(120)
    blocked = []
    dialogs = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS, timeout=60_000)
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(STEP_MS)
        context.set_default_navigation_timeout(STEP_MS)

        def guard(route):
            if urlparse(route.request.url).hostname == "127.0.0.1":
                route.continue_()
            else:
                blocked.append(route.request.url)
                route.abort()

        context.route("**/*", guard)
        page = context.new_page()
        page.on("dialog", lambda d: (dialogs.append(d.message), d.accept()))
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))

        def shot(name):
            page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)

        def log_in():
            page.goto(f"{BASE}/admin/keys")
            page.wait_for_url(re.compile(r".*/admin/login\?next=.*"))
            shot("01-login")
            page.fill("#token", TOKEN)
            page.click("#login")
            page.wait_for_url(re.compile(r".*/admin/keys$"))
            expect(page.locator("h1")).to_have_text("Keys")
            shot("02-keys-empty")

        def import_keys():
            text = f"two keys for the pool:\n  {KEYS[0]}, and {KEYS[1]}\nand {KEYS[0]} again"
            page.fill("#import-text", text)
            page.click("#import")
            expect(page.locator("#result")).to_contain_text("2 added", timeout=STEP_MS)
            page.wait_for_load_state("load")
            for key in KEYS:
                expect(page.locator("code.masked", has_text=key[:6] + "…" + key[-4:])).to_be_visible()
            body = page.inner_text("body")
            for key in KEYS:
                assert key not in body, "a key shows in clear"
            shot("03-keys-imported")

        def disable_one():
            masked = KEYS[0][:6] + "…" + KEYS[0][-4:]
            row = page.locator("tr[data-id]", has=page.locator("code.masked", has_text=masked))
            row.locator("button[data-act=disable]").click()
            expect(row.locator(".state")).to_have_text("disabled", timeout=STEP_MS)
            other = page.locator("tr[data-id]", has=page.locator("code.masked", has_text=KEYS[1][-4:]))
            expect(other.locator(".state")).to_have_text("active")
            shot("04-key-disabled")

        def set_project():
            masked = KEYS[1][:6] + "…" + KEYS[1][-4:]
            row = page.locator("tr[data-id]", has=page.locator("code.masked", has_text=masked))
            row.locator("button[data-act=place]").click()
            dialog = page.locator("#place-dialog")
            expect(dialog).to_be_visible()
            page.fill("#place-project", "team-a")
            page.select_option("#place-tier", "free")
            shot("04b-project-dialog")
            page.click("#place-save")
            expect(page.locator("#result")).to_contain_text("project team-a", timeout=STEP_MS)
            page.wait_for_load_state("load")
            expect(row.locator("td.project")).to_contain_text("team-a", timeout=STEP_MS)
            expect(row.locator("td.project")).to_contain_text("free")
            expect(page.locator("#projects")).to_contain_text("team-a")
            shot("04c-project-set")

        def change_setting():
            page.click("header nav a[href='/admin/settings']")
            page.wait_for_url(re.compile(r".*/admin/settings$"))
            expect(page.locator("#f-MAX_FAILURES")).to_have_value("3")
            shot("05-settings")
            page.fill("#f-MAX_FAILURES", "7")
            page.click("#save")
            page.wait_for_url(re.compile(r".*/admin/settings\?saved=.*"))
            expect(page.locator("#saved")).to_contain_text("keys.max_failures")
            expect(page.locator("#f-MAX_FAILURES")).to_have_value("7")
            expect(page.locator("#setting-MAX_FAILURES")).to_contain_text("file")
            shot("06-settings-saved")

        def see_it_applied():
            page.click("header nav a[href='/admin/plugins']")
            expect(page.locator("#last-result")).to_have_text("ok")
            page.click("header nav a[href='/admin']")
            expect(page.locator("h1")).to_have_text("Dashboard")
            expect(page.locator("body")).to_contain_text("1 active · 0 cooling · 1 disabled")
            shot("07-dashboard")

        def edit_plugin():
            page.click("header nav a[href='/admin/plugins']")
            page.click("button.open-file[data-file=round_robin]")
            code = page.locator("#editor-code")
            expect(code).to_have_value(re.compile(r'name = "round_robin"'))
            original = code.input_value()
            target = "return pool:next_id(cursor)"
            line = original[: original.index(target)].count("\n") + 1
            code.fill(original.replace(target, target + " +"))
            page.click("#editor-check")
            expect(page.locator("#editor-result")).to_contain_text("Does not load", timeout=STEP_MS)
            expect(page.locator("#editor-gutter span.bad")).to_have_text(f"{line + 1}\n")
            shot("08-plugin-check-failed")
            page.click("#editor-save")
            expect(page.locator("#editor-result")).to_contain_text("Not saved", timeout=STEP_MS)
            code.fill(original.replace(target, "-- edited in the browser\n    " + target))
            page.click("#editor-save")
            expect(page.locator("#editor-result")).to_contain_text("Saved; reload done", timeout=STEP_MS)
            expect(page.locator("#editor-result")).to_contain_text("0 failed")
            expect(page.locator("#editor-gutter span.bad")).to_have_count(0)
            shot("09-plugin-saved")

        def dry_run():
            page.fill("#dry-model", "gemini-2.5-flash")
            page.click("#dry-run")
            expect(page.locator("#dry-result")).to_contain_text("(by round_robin)", timeout=STEP_MS)
            shot("10-dry-run")

        step("log in", log_in)
        step("import two keys by pasting text", import_keys)
        step("disable one", disable_one)
        step("put the other in a project", set_project)
        step("change a setting", change_setting)
        step("see it applied", see_it_applied)
        step("edit a plugin", edit_plugin)
        step("dry-run a request", dry_run)
        context.close()
        browser.close()
    signal.alarm(0)
    assert not blocked, f"the page asked for other hosts: {blocked}"
    assert not errors, f"script errors on the page: {errors}"
    shots = sorted(s.name for s in SHOTS.glob("*.png"))
    print(f"screenshots in {SHOTS}: {', '.join(shots)}")
    print("browser test passed")


if __name__ == "__main__":
    main()
