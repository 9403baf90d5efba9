// Preloaded (node --import) into the suite's origin server: its server.mjs calls
// server.listen(port), which binds every interface. Pin it to loopback so the test origin
// (it serves files from the package directory) is never reachable from the network.
import http from 'node:http'

const listen = http.Server.prototype.listen
http.Server.prototype.listen = function (...args) {
  if (args.length >= 1 && (typeof args[0] === 'number' || typeof args[0] === 'string') &&
      typeof args[1] !== 'string') {
    return listen.call(this, Number(args[0]), '127.0.0.1', ...args.slice(1))
  }
  return listen.apply(this, args)
}
