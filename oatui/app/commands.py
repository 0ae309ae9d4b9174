"""The command palette's oatui commands (ctrl+p): every action of the app, searchable by name."""

from __future__ import annotations

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider

#: (name, help, action run on the app) for every oatui command.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("Launch SFT run", "Open the SFT launch form (key 1)", "launch('sft')"),
    ("Launch RM run", "Open the reward-model launch form (key 2)", "launch('rm')"),
    ("Launch RL run", "Open the PPO launch form (key 3)", "launch('rl')"),
    ("Stop run", "Stop the selected run after a checkpoint (key x)", "stop_run"),
    ("Export model", "Export the selected run's model into the Triton repository (key e)", "export"),
    ("Start/stop server", "Start or stop tritonserver on the workspace repository (key s)", "toggle_server"),
    ("Restart server", "Start tritonserver again, after it died or to serve a new export (ctrl+t)",
     "restart_server"),
    ("Run the demo", "The whole flow on the tiny default: data, SFT, RM, RL, export, serve, chat, compare "
     "(key a; asks first)", "demo"),
    ("Stop the demo", "Stop the demo flow: the current run stops after a checkpoint (key a or x)", "stop_demo"),
    ("Demo progress", "Show the demo flow's phases and summary", "show_demo"),
    ("Chat", "Focus the chat pane (key c)", "focus_chat"),
    ("GPUs", "Focus and zoom the GPU panel (key g)", "focus_gpus"),
    ("Runs", "Focus the list of runs (key r)", "focus_runs"),
    ("Run log", "Show the selected run's log (key l)", "show_log"),
    ("Run curves", "Show the selected run's curves (key v)", "show_curves"),
    ("Pick metrics", "Choose the metrics the curves draw, any metric the runs logged (key /)", "pick_metrics"),
    ("More smoothing", "Smooth the curves more: TensorBoard's EMA weight (key ])", "smoothing(1)"),
    ("Less smoothing", "Smooth the curves less, down to the raw values (key [)", "smoothing(-1)"),
    ("Compare runs", "Keep the selected run on the curves; select another to draw both on the same axes "
     "(key m)", "compare_run"),
    ("Zoom", "Zoom the focused panel in or out (key z)", "zoom"),
    ("Next panel", "Move the focus to the next panel (tab)", "focus_next"),
    ("Unzoom", "Give a zoomed panel its place back (Esc)", "unzoom"),
    ("New conversation", "Start a new chat conversation (ctrl+n in the chat)", "new_conversation"),
    ("Chat options", "Model, system prompt, sampling parameters, answers to rank (ctrl+o in the chat)",
     "chat_options"),
    ("Rank mode", "Each prompt gets K answers to put in order, saved as feedback data (ctrl+r in the chat)",
     "toggle_rank"),
    ("Blind A/B", "Two models answer each prompt as A and B in a random order; pick the better one or a tie, "
     "saved as feedback data, with the pair's win rate (ctrl+g in the chat)", "toggle_ab"),
    ("Copy answer", "Copy the last answer to the clipboard (ctrl+y in the chat)", "copy_answer"),
    ("Refresh", "Read GPUs, runs and the server again now", "refresh_now"),
    ("Help", "Every key binding (key ?)", "help"),
    ("Quit", "Quit the app; runs and the server keep going (key q)", "quit"),
)


class OatuiCommands(Provider):
    """oatui's own commands, next to Textual's system commands."""

    async def discover(self) -> Hits:
        for name, help_text, action in COMMANDS:
            yield DiscoveryHit(name, partial(self.app.run_action, action), help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, help_text, action in COMMANDS:
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), partial(self.app.run_action, action), help=help_text)
