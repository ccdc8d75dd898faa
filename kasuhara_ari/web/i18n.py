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
        # -- the recording page (web/recordings.py)
        "rec_title": "録音",
        "rec_call": "通話",
        "rec_direction": "方向",
        "rec_dir_inbound": "着信",
        "rec_dir_outbound": "発信",
        "rec_caller_number": "発信者番号",
        "rec_caller_name": "発信者名",
        "rec_target": "着信先",
        "rec_agent": "担当者",
        "rec_started": "開始",
        "rec_answered": "応答（録音開始）",
        "rec_agent_answered": "担当者応答",
        "rec_ended": "終了",
        "rec_duration": "録音時間",
        "rec_seconds": "秒",
        "rec_end_reason": "終了理由",
        "rec_flags": "フラグ",
        "rec_notice_played": "録音告知",
        "rec_yes": "あり",
        "rec_no": "なし",
        "rec_timezone": "時刻の表示",
        "rec_integrity": "証拠の完全性",
        "rec_capture_sha": "録音時の SHA-256",
        "rec_stored_sha": "S3 に記録された SHA-256",
        "rec_capture_bytes": "録音時のサイズ",
        "rec_stored_bytes": "S3 上のサイズ",
        "rec_version": "証拠のバージョン",
        "rec_bytes": "バイト",
        "rec_none": "（記録なし）",
        "rec_v_consistent": (
            "S3 のバージョンは録音時の記録と一致します（内容のハッシュは波形作成時とダウンロード時に検証）。"
        ),
        "rec_v_unverifiable": "録音時の SHA-256 がないため検証できません（改ざんではなく来歴の欠落）。",
        "rec_v_meta_mismatch": "S3 に記録された SHA-256 が録音時の値と異なります。",
        "rec_v_size_mismatch": "S3 上のサイズが録音時の値と異なります。",
        "rec_v_missing": "証拠のバージョンが S3 にありません。",
        "rec_v_content_verified": "内容のハッシュを検証済み：録音時の SHA-256 と一致。",
        "rec_v_content_mismatch": "完全性エラー：内容のハッシュが録音時の SHA-256 と一致しません。",
        "rec_v_checking": "内容のハッシュを検証中…",
        "rec_superseded": "後のバージョンがあります（改ざんの可能性）",
        "rec_hold": "保全",
        "rec_held": "保全中",
        "rec_not_held": "保全されていません",
        "rec_hold_by": "実行者",
        "rec_hold_at": "日時",
        "rec_reason": "理由",
        "rec_player": "再生",
        "rec_play": "再生",
        "rec_pause": "一時停止",
        "rec_play_audited": "再生は監査ログに「play」として記録されます。",
        "rec_waveform": "波形とイベント",
        "rec_waveform_unavailable": "波形を表示できません",
        "rec_markers": "イベント",
        "rec_no_markers": "イベントの記録はありません。",
        "rec_m_notice": "録音告知",
        "rec_m_answered": "担当者応答",
        "rec_m_flag": "フラグ",
        "rec_m_warning": "警告",
        "rec_m_supervisor": "責任者参加",
        "rec_m_ended": "終了",
        "rec_actions": "操作",
        "rec_do_hold": "保全する",
        "rec_do_release": "保全を解除する",
        "rec_do_download": "ダウンロード",
        "rec_do_export": "証拠パッケージ（zip）を出力",
        "rec_do_delete": "削除する",
        "rec_delete_confirm": "確認のため通話 ID を入力",
        "rec_delete_held": "保全中の録音は削除できません（先に保全を解除してください）。",
        "rec_reason_required": "理由を入力してください。",
        "rec_reason_too_long": "理由が長すぎます（500 文字まで）。",
        "rec_confirm_mismatch": "確認の通話 ID が一致しません。何も削除していません。",
        "rec_done_hold": "保全しました。",
        "rec_done_already_held": "すでに保全されています。",
        "rec_done_release": "保全を解除しました。",
        "rec_done_not_held": "保全されていなかったため、何もしていません。",
        "rec_deleted": "録音を削除しました",
        "rec_deleted_versions": "削除したオブジェクトのバージョン数",
        "rec_not_found": "録音が見つかりません",
        "rec_refused": "この操作は拒否されました",
        "rec_failed": "操作を完了できませんでした",
        "rec_integrity_failure": "完全性エラー",
        "rec_storage_failed": "ストレージ（S3）に接続できませんでした",
        "rec_back": "録音に戻る",
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
        # -- the recording page (web/recordings.py)
        "rec_title": "Recording",
        "rec_call": "Call",
        "rec_direction": "Direction",
        "rec_dir_inbound": "inbound",
        "rec_dir_outbound": "outbound",
        "rec_caller_number": "Caller number",
        "rec_caller_name": "Caller name",
        "rec_target": "Target",
        "rec_agent": "Agent",
        "rec_started": "Started",
        "rec_answered": "Answered (recording start)",
        "rec_agent_answered": "Agent answered",
        "rec_ended": "Ended",
        "rec_duration": "Recorded time",
        "rec_seconds": "s",
        "rec_end_reason": "End reason",
        "rec_flags": "Flags",
        "rec_notice_played": "Recording notice",
        "rec_yes": "yes",
        "rec_no": "no",
        "rec_timezone": "Times shown in",
        "rec_integrity": "Evidence integrity",
        "rec_capture_sha": "SHA-256 at capture",
        "rec_stored_sha": "SHA-256 stored in S3",
        "rec_capture_bytes": "Size at capture",
        "rec_stored_bytes": "Size in S3",
        "rec_version": "Evidence version",
        "rec_bytes": "bytes",
        "rec_none": "(none recorded)",
        "rec_v_consistent": (
            "The S3 version agrees with what capture recorded (the content hash is checked when the "
            "waveform is made and at download)."
        ),
        "rec_v_unverifiable": (
            "Unverifiable: no SHA-256 was recorded at capture (missing provenance, not a mismatch)."
        ),
        "rec_v_meta_mismatch": "The SHA-256 stored in S3 differs from the one recorded at capture.",
        "rec_v_size_mismatch": "The size in S3 differs from the one recorded at capture.",
        "rec_v_missing": "The evidence version is missing from S3.",
        "rec_v_content_verified": "Content hash verified: matches the SHA-256 recorded at capture.",
        "rec_v_content_mismatch": (
            "INTEGRITY FAILURE: the content does not hash to the SHA-256 recorded at capture."
        ),
        "rec_v_checking": "Checking the content hash…",
        "rec_superseded": "A later version exists (possible tampering)",
        "rec_hold": "Hold",
        "rec_held": "Held",
        "rec_not_held": "Not held",
        "rec_hold_by": "By",
        "rec_hold_at": "At",
        "rec_reason": "Reason",
        "rec_player": "Playback",
        "rec_play": "Play",
        "rec_pause": "Pause",
        "rec_play_audited": 'Playback is written to the audit log as "play".',
        "rec_waveform": "Waveform and events",
        "rec_waveform_unavailable": "The waveform cannot be shown",
        "rec_markers": "Events",
        "rec_no_markers": "No events recorded.",
        "rec_m_notice": "Notice",
        "rec_m_answered": "Agent answered",
        "rec_m_flag": "Flag",
        "rec_m_warning": "Warning",
        "rec_m_supervisor": "Supervisor joined",
        "rec_m_ended": "Ended",
        "rec_actions": "Actions",
        "rec_do_hold": "Hold",
        "rec_do_release": "Release the hold",
        "rec_do_download": "Download",
        "rec_do_export": "Export evidence bundle (zip)",
        "rec_do_delete": "Delete",
        "rec_delete_confirm": "Type the call id to confirm",
        "rec_delete_held": "A held recording cannot be deleted (release it first).",
        "rec_reason_required": "A reason is required.",
        "rec_reason_too_long": "The reason is too long (500 characters at most).",
        "rec_confirm_mismatch": "The call id typed does not match. Nothing was deleted.",
        "rec_done_hold": "Held.",
        "rec_done_already_held": "It was already held.",
        "rec_done_release": "The hold is released.",
        "rec_done_not_held": "It was not held; nothing was done.",
        "rec_deleted": "Recording deleted",
        "rec_deleted_versions": "Object versions deleted",
        "rec_not_found": "Recording not found",
        "rec_refused": "Refused",
        "rec_failed": "The action could not be completed",
        "rec_integrity_failure": "Integrity failure",
        "rec_storage_failed": "The storage (S3) could not be reached",
        "rec_back": "Back to the recording",
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
