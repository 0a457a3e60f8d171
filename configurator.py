"""
Poor man's configurator, run by train.py with exec(). Arguments are config files (plain Python assigning existing
globals) or --key=value overrides: Python literals where they parse (--lr=1e-4, --steps=(2,4)), else strings.
"""
import os as _os
import sys as _sys
import types as _types
from ast import literal_eval as _literal_eval

_print = print if int(_os.environ.get('RANK', 0)) == 0 else (lambda *a, **k: None)

def _coerce(_key, _v, _old, _where):
    if isinstance(_old, float) and type(_v) is int:
        return float(_v)  # --lr=1 means 1.0
    if isinstance(_old, tuple) and isinstance(_v, list):
        return tuple(_v)
    if _old is not None and _v is not None and type(_v) is not type(_old):
        raise ValueError(f'{_where}: {_key} expects {type(_old).__name__}, got {_v!r}')
    return _v

for _arg in _sys.argv[1:]:
    if not _arg.startswith('--'):  # a config file
        if not _os.path.isfile(_arg):
            raise FileNotFoundError(f'config file not found: {_arg}')
        _ns = dict(globals())
        exec(open(_arg).read(), _ns)
        if _unknown := [k for k, v in _ns.items() if k not in globals() and not k.startswith('_')
                        and not isinstance(v, _types.ModuleType)]:  # a typo must not silently become a new global
            raise ValueError(f'unknown config key(s) in {_arg}: {_unknown}')
        for _k in [k for k in globals() if not k.startswith('_') and k in _ns and _ns[k] is not globals()[k]]:
            globals()[_k] = _coerce(_k, _ns[_k], globals()[_k], _arg)
        _print(f'config file {_arg} applied')
    else:  # --key=value
        if '=' not in _arg:
            raise ValueError(f'expected --key=value, got {_arg!r}')
        _key, _val = _arg[2:].split('=', 1)  # split once: values may contain '='
        if _key not in globals() or _key.startswith('_'):
            raise ValueError(f'unknown config key: {_key!r} (from {_arg!r})')
        try:
            _v = _literal_eval(_val)
        except (SyntaxError, ValueError):
            _v = _val
        globals()[_key] = _coerce(_key, _v, globals()[_key], 'command line')
        _print(f'override: {_key} = {globals()[_key]!r}')
