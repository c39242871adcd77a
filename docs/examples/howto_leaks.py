"""How-to, leaks and diagnostics: leak_timeout warnings, holders(), PoolTimeout messages."""

import logging
import sys

import trio

import triopool


class LeakAlarm(logging.Handler):
    """Remembers the pool's leak warnings (a real one might page someone)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.raised = trio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if "held by task" in record.getMessage():
            self.messages.append(record.getMessage())
            self.raised.set()


async def main(dsn: str) -> None:
    alarm = LeakAlarm()
    logging.getLogger("triopool").addHandler(alarm)
    try:
        async with (
            triopool.open_pool(dsn, name="app", min_size=1, leak_timeout=0.1, wait=True) as pool,
            pool.connection(),  # held for too long...
        ):
            print([holder.task_name for holder in pool.holders()])
            await alarm.raised.wait()  # ...so the pool warns after 0.1 s
            # The warning's first line; the following ones show where it was acquired.
            print(alarm.messages[0].splitlines()[0])

            try:
                await pool.getconn(timeout=0.1)
            except triopool.PoolTimeout as exc:
                print(exc)  # says what the pool was doing
    finally:
        logging.getLogger("triopool").removeHandler(alarm)


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
