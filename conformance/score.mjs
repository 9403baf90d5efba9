#!/usr/bin/env node
// Scores http-cache-tests results the way cache-tests.fyi does, using the suite's own test
// definitions (tests/*.mjs) and its own classifier (lib/display.mjs determineTestResult),
// prints edgecache beside the results published inside the package, and checks the
// required tests that do not pass against conformance/expected-failures.txt.
//
//   node conformance/score.mjs --suite DIR [--results FILE] [--expected FILE] [--summary FILE]
//
// DIR is the installed package (…/node_modules/http-cache-tests). Exit codes: 0 all good,
// 1 the expected-failures list is not true any more (new failure, or a listed test passes),
// 2 usage error or an unusable results file.

import fs from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const here = path.dirname(new URL(import.meta.url).pathname)

function parseArgs (argv) {
  const opts = {
    suite: null,
    results: path.join(here, 'results', 'edgecache.json'),
    expected: path.join(here, 'expected-failures.txt'),
    summary: null,
    name: 'edgecache'
  }
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]
    const val = () => {
      if (i + 1 >= argv.length) usage(`${a} needs a value`)
      return argv[++i]
    }
    if (a === '--suite') opts.suite = val()
    else if (a === '--results') opts.results = val()
    else if (a === '--expected') opts.expected = val()
    else if (a === '--summary') opts.summary = val()
    else if (a === '--name') opts.name = val()
    else if (a === '-h' || a === '--help') usage(null)
    else usage(`unknown argument ${a}`)
  }
  if (!opts.suite) usage('--suite is required')
  return opts
}

function usage (msg) {
  if (msg) console.error(`score.mjs: ${msg}`)
  console.error('usage: node score.mjs --suite PKGDIR [--results FILE] [--expected FILE] [--summary FILE] [--name NAME]')
  process.exit(msg ? 2 : 0)
}

const opts = parseArgs(process.argv.slice(2))
const suiteDir = path.resolve(opts.suite)
const imp = rel => import(pathToFileURL(path.join(suiteDir, rel)).href)

// The same test list the CLI runs (cli.mjs: tests/index.mjs plus Surrogate-Control).
const testSuites = [...(await imp('tests/index.mjs')).default]
testSuites.push((await imp('tests/surrogate-control.mjs')).default)
const { determineTestResult } = await imp('lib/display.mjs')
const published = (await imp('results/index.mjs')).default
const suiteVersion = JSON.parse(fs.readFileSync(path.join(suiteDir, 'package.json'), 'utf8')).version

const tests = new Map() // id -> test (with suite name)
for (const suite of testSuites) {
  for (const test of suite.tests) tests.set(test.id, { ...test, suiteId: suite.id, suiteName: suite.name })
}
// The suite's default kind is "required" (display.mjs: kind === 'required' || undefined).
const kindOf = test => test.kind || 'required'

// determineTestResult returns one of display.mjs's resultTypes; the third element is the
// CLI symbol, which names the category.
const CATEGORY = {
  '-': 'untested',
  '✅': 'pass',
  '⛔️': 'fail',
  '⚠️': 'optimal_not',
  Y: 'yes',
  N: 'no',
  '🔹': 'setup',
  '⁉️': 'harness',
  '⚪️': 'dependency',
  '↻': 'retry'
}
const NOT_PASSING = new Set(['fail', 'setup', 'harness', 'dependency', 'retry'])

function score (results, { browser = false } = {}) {
  const s = {
    required_pass: 0,
    required_fail: 0,
    optimal_pass: 0,
    optimal_not: 0,
    check_yes: 0,
    check_no: 0,
    setup: 0,
    harness: 0,
    dependency: 0,
    retry: 0,
    untested: 0,
    not_applicable: 0,
    unknown: Object.keys(results).filter(id => !tests.has(id)),
    byTest: new Map()
  }
  for (const [id, test] of tests) {
    const applicable = !(browser ? test.browser_skip === true : test.browser_only === true)
    let category
    try {
      category = CATEGORY[determineTestResult(testSuites, id, results)[2]]
    } catch (err) {
      category = 'harness'
    }
    if (category === undefined) throw new Error(`unclassified result for ${id}`)
    if (category === 'untested' && !applicable) {
      s.not_applicable++
      continue
    }
    const kind = kindOf(test)
    s.byTest.set(id, { category, kind, result: results[id] })
    if (category === 'pass') s[kind === 'optimal' ? 'optimal_pass' : 'required_pass']++
    else if (category === 'fail') s.required_fail++
    else if (category === 'optimal_not') s.optimal_not++
    else if (category === 'yes') s.check_yes++
    else if (category === 'no') s.check_no++
    else s[category]++
  }
  return s
}

function readJson (file) {
  let data
  try {
    data = JSON.parse(fs.readFileSync(file, 'utf8'))
  } catch (err) {
    console.error(`score.mjs: cannot read results ${file}: ${err.message}`)
    process.exit(2)
  }
  if (data === null || typeof data !== 'object' || Array.isArray(data) || Object.keys(data).length === 0) {
    console.error(`score.mjs: ${file} is not a results object (test id -> result)`)
    process.exit(2)
  }
  return data
}

const uuidRe = /[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}/g
const message = result => Array.isArray(result)
  ? `[${result[0]}] ${String(result[1]).replace(uuidRe, '<uuid>')}`
  : String(result)

// ---------------------------------------------------------------------------------------
// edgecache
const ours = readJson(opts.results)
const mine = score(ours)
const ran = tests.size - mine.not_applicable
const notRun = [...mine.byTest].filter(([, t]) => t.category === 'untested').map(([id]) => id)

const out = []
const say = line => out.push(line)
const flush = () => { console.log(out.join('\n')); out.length = 0 }

const kindCounts = {}
for (const t of tests.values()) kindCounts[kindOf(t)] = (kindCounts[kindOf(t)] || 0) + 1
const notPassingBy = (cat, kind) => [...mine.byTest.values()].filter(t => t.category === cat && (!kind || t.kind === kind)).length

say(`== ${opts.name} vs http-cache-tests ${suiteVersion} (${path.relative(process.cwd(), opts.results) || opts.results})`)
say(`   ${tests.size} tests defined (${kindCounts.required || 0} required, ${kindCounts.optimal || 0} optimal, ${kindCounts.check || 0} check); ` +
  `${ran} apply to a proxy, ${mine.not_applicable} browser-only`)
say(`   ${'required:'.padEnd(12)}${mine.required_pass} pass, ${mine.required_fail} fail`)
const failNames = {}
for (const t of mine.byTest.values()) {
  if (t.category === 'fail' && Array.isArray(t.result)) failNames[t.result[0]] = (failNames[t.result[0]] || 0) + 1
}
if (Object.keys(failNames).length) {
  say(`   ${''.padEnd(12)}fail by error: ${Object.entries(failNames).map(([k, v]) => `${k} ${v}`).join(', ')}`)
}
say(`   ${'optimal:'.padEnd(12)}${mine.optimal_pass} pass, ${mine.optimal_not} not optimal`)
say(`   ${'check:'.padEnd(12)}${mine.check_yes} yes, ${mine.check_no} no`)
for (const cat of ['setup', 'harness', 'dependency', 'retry']) {
  const by = ['required', 'optimal', 'check'].map(k => `${notPassingBy(cat, k)} ${k}`).join(', ')
  say(`   ${(cat + ':').padEnd(12)}${mine[cat]} (${by})`)
}
say(`   ${'untested:'.padEnd(12)}${mine.untested}${notRun.length ? ' — ' + notRun.join(' ') : ''}`)
if (mine.unknown.length) say(`   results for unknown test ids (ignored): ${mine.unknown.join(' ')}`)

// ---------------------------------------------------------------------------------------
// Table: edgecache beside the published results, same scorer.
const COLS = [
  ['required pass', 'required_pass'],
  ['required fail', 'required_fail'],
  ['optimal pass', 'optimal_pass'],
  ['optimal not', 'optimal_not'],
  ['check yes', 'check_yes'],
  ['check no', 'check_no'],
  ['setup', 'setup'],
  ['harness', 'harness'],
  ['dependency', 'dependency'],
  ['retry', 'retry'],
  ['untested', 'untested']
]
const table = []
table.push(`| implementation | type | ${COLS.map(c => c[0]).join(' | ')} |`)
table.push(`|---|---|${COLS.map(() => '---:').join('|')}|`)
const row = (label, type, s) => table.push(`| ${label} | ${type} | ${COLS.map(c => s[c[1]]).join(' | ')} |`)
row(`**${opts.name}** (this run)`, 'rev-proxy', mine)
const listed = new Set(published.map(item => item.file))
for (const file of fs.readdirSync(path.join(suiteDir, 'results')).sort()) {
  if (file.endsWith('.json') && !listed.has(file)) published.push({ file, name: file.replace(/\.json$/, ''), type: '?', version: '' })
}
for (const item of published) {
  const file = path.join(suiteDir, 'results', item.file)
  if (!fs.existsSync(file)) continue
  const s = score(JSON.parse(fs.readFileSync(file, 'utf8')), { browser: item.type === 'browser' })
  row(`${item.name} ${item.version}`, item.type, s)
}
say('')
say(`== Scored with http-cache-tests ${suiteVersion}'s own classifier; published results from its results/*.json`)
say('   (setup/harness/dependency/retry count tests of every kind; "untested" = applicable but no result)')
out.push(...table)

// A dependency failure hides the test's own result (often meaningless without the
// dependency); show both.
function explain (id, t) {
  if (t.category !== 'dependency') return message(t.result)
  const deps = tests.get(id).depends_on.map(d => `${d} (${mine.byTest.get(d)?.category || 'untested'})`)
  return `blocked by ${deps.join(', ')}; own result: ${message(t.result)}`
}

// ---------------------------------------------------------------------------------------
// Required tests that do not pass, and optimal tests that are not optimal.
const notPassingRequired = [...mine.byTest].filter(([, t]) => t.kind === 'required' && NOT_PASSING.has(t.category))
const listing = []
say('')
say(`== Required tests ${opts.name} does not pass: ${notPassingRequired.length}`)
for (const cat of ['fail', 'setup', 'harness', 'dependency', 'retry']) {
  const these = notPassingRequired.filter(([, t]) => t.category === cat)
  if (!these.length) continue
  listing.push(`### required, ${cat} (${these.length})`, '')
  say(`-- ${cat} (${these.length})`)
  for (const [id, t] of these) {
    const test = tests.get(id)
    const why = explain(id, t)
    say(`   ${id} — ${test.name}`)
    say(`       ${why}`)
    listing.push(`- \`${id}\` — ${test.name}<br>${why}`)
  }
  listing.push('')
}
const notOptimal = [...mine.byTest].filter(([, t]) => t.kind === 'optimal' && t.category !== 'pass')
say('')
say(`== Optimal tests that are not optimal (or not determined): ${notOptimal.length}`)
if (notOptimal.length) listing.push(`### optimal, not passing (${notOptimal.length})`, '')
for (const [id, t] of notOptimal) {
  const test = tests.get(id)
  const why = explain(id, t)
  say(`   ${id} [${t.category}] — ${test.name}`)
  say(`       ${why}`)
  listing.push(`- \`${id}\` [${t.category}] — ${test.name}<br>${why}`)
}
flush()

if (opts.summary) {
  const md = [
    `# edgecache vs http-cache-tests ${suiteVersion}`,
    '',
    'Generated by `conformance/run.sh` (do not edit). Categories are the suite\'s own',
    '(`lib/display.mjs`); published rows are the `results/*.json` shipped in the package,',
    'scored with the same code.',
    '',
    ...table,
    '',
    ...listing
  ]
  fs.mkdirSync(path.dirname(opts.summary), { recursive: true })
  fs.writeFileSync(opts.summary, md.join('\n'))
}

// ---------------------------------------------------------------------------------------
// Gate against expected-failures.txt.
const problems = []
const expected = new Map()
if (fs.existsSync(opts.expected)) {
  const lines = fs.readFileSync(opts.expected, 'utf8').split('\n')
  lines.forEach((raw, i) => {
    const line = raw.replace(/\s+$/, '')
    if (line.trim() === '' || line.trim().startsWith('#')) return
    const m = line.trim().match(/^(\S+)\s+(.*\S)$/)
    const where = `${path.basename(opts.expected)}:${i + 1}`
    if (!m) { problems.push(`${where}: "${line.trim()}" has no reason (format: test-id  reason)`); return }
    const [, id, reason] = m
    if (expected.has(id)) { problems.push(`${where}: ${id} is listed twice`); return }
    if (!tests.has(id)) { problems.push(`${where}: ${id} is not a test in http-cache-tests ${suiteVersion}`); return }
    if (kindOf(tests.get(id)) !== 'required') {
      problems.push(`${where}: ${id} is a "${kindOf(tests.get(id))}" test; list only required tests`)
      return
    }
    expected.set(id, reason)
  })
} else {
  problems.push(`${opts.expected} is missing`)
}

if (notRun.length) problems.push(`${notRun.length} applicable tests have no result (incomplete run): ${notRun.join(' ')}`)
const failingIds = new Set(notPassingRequired.map(([id]) => id))
const unexpected = notPassingRequired.filter(([id]) => !expected.has(id))
const nowPassing = [...expected.keys()].filter(id => !failingIds.has(id))

console.log('')
console.log(`== expected failures (${path.relative(process.cwd(), opts.expected) || opts.expected}): ` +
  `${expected.size} listed, ${notPassingRequired.length - unexpected.length} of them still not passing`)
for (const id of nowPassing) {
  const t = mine.byTest.get(id)
  problems.push(`listed test ${id} ${t ? `is now "${t.category}"` : 'was not run'}: remove its line`)
}
if (unexpected.length) {
  problems.push(`${unexpected.length} required test(s) do not pass and are not listed (see below)`)
}
if (problems.length) {
  for (const p of problems) console.log(`FAIL: ${p}`)
  if (unexpected.length) {
    console.log('')
    console.log(`Not listed — fix them, or add these lines to ${path.basename(opts.expected)} with the reason:`)
    for (const [id, t] of unexpected) {
      const hint = t.category === 'dependency'
        ? `(blocked by ${tests.get(id).depends_on.join(', ')})`
        : `(${t.category}: ${message(t.result)})`
      console.log(`${id}  TODO reason ${hint}`)
    }
  }
  process.exit(1)
}
console.log(`OK: every required test passes or is listed with a reason (${expected.size} listed)`)
