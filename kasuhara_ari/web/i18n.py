"""The console's words in Japanese (default) and English: one dict per language, no gettext."""

from __future__ import annotations

LANGUAGES = ("ja", "en")
DEFAULT_LANGUAGE = "ja"
LANG_COOKIE = "kasuhara_lang"

MESSAGES: dict[str, dict[str, str]] = {
    "ja": {
        "title": "kasuhara 管理画面",
        "login": "ログイン",
        "logout": "ログアウト",
        "username": "ユーザー名",
        "password": "パスワード",
        "login_failed": "ユーザー名またはパスワードが正しくありません。",
        "login_locked": "ログインの失敗が続いたため、しばらく待ってから再度お試しください。",
        "board": "通話ボード",
        "board_placeholder": "通話ボードは準備中です。",
        "signed_in_as": "ログイン中",
        "role": "権限",
        "role_viewer": "閲覧者",
        "role_supervisor": "責任者",
        "role_admin": "管理者",
        "forbidden": "この操作の権限がありません。",
        "sso_no_account": (
            "認証済みのユーザーにはこのコンソールのアカウントがないか、無効になっています。"
            "管理者に連絡してください。"
        ),
        "not_found": "ページが見つかりません",
        "not_yet": "この機能はまだありません。",
        "bad_request": "リクエストを処理できませんでした（再読み込みしてやり直してください）。",
        "error": "内部エラーが発生しました。",
        "unavailable": "アカウント情報を読み込めません。しばらくしてから再度お試しください。",
        "language": "言語",
        "back": "戻る",
    },
    "en": {
        "title": "kasuhara console",
        "login": "Log in",
        "logout": "Log out",
        "username": "User name",
        "password": "Password",
        "login_failed": "Wrong user name or password.",
        "login_locked": "Too many failed logins. Please wait and try again later.",
        "board": "Call board",
        "board_placeholder": "The call board is not there yet.",
        "signed_in_as": "Signed in as",
        "role": "Role",
        "role_viewer": "Viewer",
        "role_supervisor": "Supervisor",
        "role_admin": "Administrator",
        "forbidden": "You are not allowed to do this.",
        "sso_no_account": (
            "The user you signed in as has no console account here, or it is disabled. Ask an administrator."
        ),
        "not_found": "Page not found",
        "not_yet": "This function does not exist yet.",
        "bad_request": "The request could not be handled (reload the page and try again).",
        "error": "Internal error.",
        "unavailable": "The accounts cannot be read just now. Please try again shortly.",
        "language": "Language",
        "back": "Back",
    },
}


def choose_language(cookie: str | None, accept_language: str | None) -> str:
    """The lang cookie if valid, else the best supported Accept-Language entry, else Japanese."""
    if cookie in LANGUAGES:
        return cookie
    best: tuple[float, str] | None = None
    for index, part in enumerate((accept_language or "")[:512].split(",")[:20]):
        tag, _, params = part.strip().partition(";")
        primary = tag.strip().lower().split("-", 1)[0]
        if primary not in LANGUAGES:
            continue
        quality = 1.0
        params = params.strip()
        if params.startswith("q="):
            try:
                quality = float(params[2:])
            except ValueError:
                continue
        if quality <= 0 or quality > 1:
            continue
        # Higher quality wins; at equal quality the earlier entry does (ranked by -index).
        if best is None or quality > best[0]:
            best = (quality - index * 1e-6, primary)
    return best[1] if best else DEFAULT_LANGUAGE
